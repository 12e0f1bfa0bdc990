"""A split peer table (averaging.peer_buckets > 1): each round a node reads one bucket of
the peer records, a sample, and the swarm still averages every module with all of its
holders (matchmaking meets on the module's group key, not through the table)."""

from __future__ import annotations

import pytest
import torch

from p2ptrain.swarm.records import peer_bucket
from tests.swarm.conftest import in_parallel, swarm_config

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(300)]


def test_peers_reading_one_bucket_of_the_table_still_average_every_module_with_all_its_holders(swarm):
    # Prepare: 4 peers on a 2x2 grid, the table split in 2; rounds long enough for groups that
    # wait out the matchmaking window (a sample cannot tell when every holder is in)
    config = swarm_config("split-table", round_seconds=20.0)
    config.averaging.peer_buckets = 2
    config.averaging.matchmaking_time = 6.0
    nodes = swarm.open_all(config, ["0,0", "0,1", "1,0", "1,1"])
    start = {m: torch.cat([p.reshape(-1) for p in s.outer.global_params]).clone()
             for n in nodes for m, s in n.slots.items()}

    # Execute
    in_parallel(*[lambda n=n: n.run(max_rounds=2) for n in nodes])

    # Assert: every round, each module averaged with all of its holders; they agree; no downloads
    holders: dict[str, set] = {}
    for node in nodes:
        for module_id in node.session.module_ids:
            holders.setdefault(module_id, set()).add(node.peer_id)
    for node in nodes:
        assert len(node.history) == 2 and not node.state_downloads
        for report in node.history:
            assert all(set(r.group) == holders[m] for m, r in report.modules.items()), \
                {m: (len(r.group), r.outcome) for m, r in report.modules.items()}
    for module_id, ids in holders.items():
        flats = [torch.cat([p.reshape(-1) for p in n.slots[module_id].outer.global_params])
                 for n in nodes if n.peer_id in ids]
        moved = (flats[0] - start[module_id]).abs().max().item()
        assert moved > 0 and all((f - flats[0]).abs().max().item() < 0.01 * moved for f in flats[1:])
    # ... while each node read one bucket a round: a sample of the peers whose records sit in
    # its bucket (a record is stored under the buckets of the rounds around its writing)
    assert sorted(p.peer_id for p in nodes[0].records.fetch_peers()) == sorted(n.peer_id for n in nodes)
    for node in nodes:
        now = node.schedule.current_round()
        mine = peer_bucket(node.peer_id, now, 2)
        for record in node.records.fetch_peers(now, node.peer_id):
            assert any(peer_bucket(record.peer_id, r, 2) == mine for r in range(now - 3, now + 1))
