"""A real peer whose reducer stalls mid all-reduce, for the fault-tolerance test.

It joins like any node, but when a peer sends it a part to reduce it prints REDUCING
and never answers — so the test can SIGKILL it at exactly that moment, the way a
volunteer's machine dies mid-round. Usage: stalling_peer.py HOME RUN_TOML PATH INITIAL_PEER
"""

import asyncio
import sys
from pathlib import Path

from hivemind.averaging.allreduce import AllReduceRunner

from p2ptrain.config import RunConfig
from p2ptrain.data.corpus import load_documents
from p2ptrain.swarm.join import JoinOptions, open_node


healthy_rpc_aggregate_part = AllReduceRunner.rpc_aggregate_part


async def stall_in_a_full_group(self, stream, context):
    """Reduce normally in small groups; in a group of 3 (both survivors present), stall."""
    if len(self.ordered_peer_ids) < 3:
        async for message in healthy_rpc_aggregate_part(self, stream, context):
            yield message
        return
    print("REDUCING", flush=True)
    await asyncio.sleep(3600)
    yield  # never reached: this peer holds the others' parts and dies with them


AllReduceRunner.rpc_aggregate_part = stall_in_a_full_group

home, config_file, path, initial_peer = sys.argv[1:5]
config = RunConfig.load(config_file)
docs = load_documents(None, 4096)
opened = open_node(JoinOptions(initial_peers=[initial_peer], host_maddrs=["/ip4/127.0.0.1/tcp/0"], path=path,
                               run_config=config, device="cpu"), Path(home), lambda: docs)
opened.node.publish_status()
print("JOINED", flush=True)
opened.node.run(max_rounds=100)
