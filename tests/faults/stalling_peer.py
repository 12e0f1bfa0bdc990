"""A real peer whose reducer stalls mid all-reduce, for the fault-tolerance test.

It joins like any node, but when a peer sends it a part to reduce it prints REDUCING
and never answers — so the test can SIGKILL it at exactly that moment, the way a
volunteer's machine dies mid-round. Usage: stalling_peer.py HOME RUN_TOML PATH INITIAL_PEER
"""

import asyncio
import sys

from hivemind.averaging.allreduce import AllReduceRunner

from tests.faults.peer_process import join_and_train

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

join_and_train(*sys.argv[1:5])
