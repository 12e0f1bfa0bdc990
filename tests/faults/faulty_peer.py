"""A real peer that fails at a chosen moment of a round, for the fault-injection suite.

It joins like any node; then, in a group with at least MIN_GROUP peers:
  after_matchmaking  prints MATCHED as soon as its group is assembled and stops there;
  while_sending      prints SENDING after sending the first part of its vector and stops.
The test SIGKILLs its process group at that line, the way a volunteer's machine dies
mid-round. Usage: faulty_peer.py MODE HOME RUN_TOML PATH INITIAL_PEER
"""

import asyncio
import sys

from hivemind.averaging.allreduce import AllReduceRunner

from p2ptrain.swarm.averaging import module_averager_class
from tests.faults.peer_process import join_and_train

MIN_GROUP = 3
mode, home, config_file, path, initial_peer = sys.argv[1:6]
averager_class = module_averager_class()

if mode == "after_matchmaking":
    healthy_aggregate = averager_class._aggregate_with_group

    async def aggregate_then_fail(self, group_info, min_vector_size, **kwargs):
        if len(group_info.peer_ids) >= MIN_GROUP:
            print("MATCHED", flush=True)
            await asyncio.sleep(3600)
        return await healthy_aggregate(self, group_info, min_vector_size, **kwargs)

    averager_class._aggregate_with_group = aggregate_then_fail
elif mode == "while_sending":
    healthy_generate = AllReduceRunner._generate_input_for_peer

    async def send_one_part_then_stall(self, peer_index):
        sent = 0
        async for message in healthy_generate(self, peer_index):
            yield message
            sent += 1
            if sent == 1 and len(self.ordered_peer_ids) >= MIN_GROUP:
                print("SENDING", flush=True)
                await asyncio.sleep(3600)

    AllReduceRunner._generate_input_for_peer = send_one_part_then_stall
else:
    raise SystemExit(f"unknown mode {mode}")

join_and_train(home, config_file, path, initial_peer)
