"""Work-arounds for hivemind 1.1.12 bugs we measured, applied once before any DHT or
averager starts.

Large pipe messages: the DHT and averager processes read commands from a pipe whose
descriptor they register with uvloop's `add_reader`; libuv switches that descriptor to
non-blocking mode, so a command larger than one socket write (a run record of ~20 KB
after a previous `get`, in our measurements) arrives in pieces, `recv()` raises
BlockingIOError half-way and the child dies ("Ran out of input"). We hand the child a
loop whose `add_reader` puts the descriptor back in blocking mode: libuv only polls it,
and `recv()` then waits for the whole message.

Matchmaking that polls the DHT in a busy loop: while an averager waits for its group
and no better leader is known (it leads, or nobody else has declared yet), hivemind's
`PotentialLeaders` re-reads the group key from the DHT as soon as the previous read
returns. On loopback that is hundreds of DHT reads a second per averager: we measured
about 1 MB/s for a 4-peer swarm with three modules, 0.8x the all-reduce itself. We space
the reads of one group key by at least GROUP_KEY_POLL_S; a follower then learns of a new
leader at most that much later. Holders reach a round's end together, so that delay is
most of the time a group takes to form (0.53-0.56 s a round). Reads 0.2 s apart halved it,
but in 2 of 10 benchmark swarms a module's group then split: its leader counted a
follower that believed it had found no group and waited 5-20 s for that follower's part,
so that module's round was averaged late or not at all. Most of that wait is gone (the
follower now answers the members' parts at once and they drop it: see averaging.py's
ModuleAverager._step and sender_not_in_group). One cause of the split itself is fixed (a
follower whose search deadline cut short its wait for a late leader, see
_waiting_out_a_forming_group). Since that fix, 10 benchmark swarms with 0.2 s kept every
group whole, and cut a plain round's outer phase by 0.24-0.30 s, but the utilization
measured from outside did not follow (README, Utilization): not worth 2.5 times the
group-key reads while searching, so 0.5 s.

Admission: hivemind's matchmaking accepts any follower. A leader running p2ptrain also
refuses followers its node does not admit (see swarm/admission.py).

Shared tensors by file descriptor: hivemind switches torch's sharing strategy to
"file_system", which starts torch's shared-memory manager (a process linking all of
libtorch: 62 MB of a demo peer's 792, proportional set size) to clean up named segments.
A node shares a handful of tensors between its processes (one buffer per module, module
states on download), so passing their descriptors costs a few open files and no extra
process. A user's HIVEMIND_MEMORY_SHARING_STRATEGY still wins.

4-bit parts: a sender decodes the averages its reducers send back with the module-level
`deserialize_torch_tensor` of hivemind's allreduce.py, which knows only hivemind's codecs.
We hand it wire_codec.deserialize_part, which decodes p2ptrain's NF4 too and passes every
other codec to hivemind (our reducer's side decodes with it directly: averaging.py).

Groups that assemble once the holders we wait for are in: hivemind's leader assembles
when its group reaches `target_group_size` (or its window ends), and refuses followers
beyond it. A node does not wait for a holder that missed last round's group; sizing the
group without that holder (as we once did) made the holder's arrival a race it could
lose even when on time: as the first follower of a group sized 2 it completed the group
and displaced a holder we did wait for, and once the group was full it was refused. A
leader given `_p2ptrain_required` (peer ids) keeps its size cap, but counts the group as
full as soon as every required peer is among its followers: an absent-last-round holder
already in the group by then stays in it, one arriving later is not waited for.
"""

from __future__ import annotations

import asyncio
import os
import time

_APPLIED = False
GROUP_KEY_POLL_S = 0.5


class _BlockingReaderLoop:
    """Delegates to the real loop; `add_reader` keeps the descriptor blocking."""

    def __init__(self, loop):
        self._loop = loop

    def add_reader(self, fd, callback, *args):
        result = self._loop.add_reader(fd, callback, *args)
        os.set_blocking(fd, True)
        return result

    def __getattr__(self, name):
        return getattr(self._loop, name)


def _throttled(get_averagers):
    """Wrap GroupKeyManager.get_averagers so one manager reads its key at most every GROUP_KEY_POLL_S."""

    async def get_averagers_throttled(self, group_key, only_active):
        wait = getattr(self, "_p2ptrain_last_read", -float("inf")) + GROUP_KEY_POLL_S - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self._p2ptrain_last_read = time.monotonic()
        return await get_averagers(self, group_key, only_active)

    return get_averagers_throttled


def _admitting(hivemind_checks):
    """Wrap Matchmaking._check_reasons_to_reject so a leader also refuses followers that our
    node does not admit (closed runs: no credential; banned peers). The follower's peer id
    is the one libp2p authenticated for this connection, not a claim."""

    def check_reasons_to_reject(self, request, context):
        from hivemind.proto import averaging_pb2
        admission = getattr(self, "_p2ptrain_admission", None)
        if admission is not None and not admission.admits(context.remote_id.to_base58()):
            return averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
        return hivemind_checks(self, request, context)

    return check_reasons_to_reject


def _joining_admitted_leaders_only(request_join_group):
    """Wrap Matchmaking._request_join_group so a follower never asks a leader its node does not
    admit: such a group would be left before any data moved, costing the round."""

    async def join_admitted_leader(self, leader):
        admission = getattr(self, "_p2ptrain_admission", None)
        if admission is not None and not admission.admits(leader.to_base58()):
            return None
        return await request_join_group(self, leader)

    return join_admitted_leader


def _waiting_out_a_forming_group():
    """A replacement for Matchmaking.look_for_group (hivemind 1.1.12's, with one change): when the
    search's deadline comes while a leader has accepted us, or while we lead followers,
    wait up to `request_timeout` more for that group instead of giving up at once.

    A leader assembles at its declared expiration, which is never later than an accepted
    follower's deadline, but only once its event loop gets there: on a loaded machine its
    BEGIN_ALLREDUCE can arrive after a follower whose search was short (a module that
    searched alone last round searches only until the next round) has given up. The leader
    has counted that follower in already: it then waits for the follower's parts, and the
    two end the round apart (measured: a leader whose loop stalls 1.2 s as it assembles
    split 3 of 3 such rounds; the fault suite's peer killed after matchmaking showed the
    same split on the CI machine). hivemind's own follower waits `request_timeout` past
    the leader's expiration for that answer; only the outer deadline cut it short."""
    from hivemind.utils.asyncio import cancel_and_wait

    async def look_for_group(self, step):
        async with self.looking_for_group(step):
            request_leaders_task = asyncio.create_task(self._request_join_potential_leaders(step))
            try:
                try:  # shielded: a timeout must not cancel a group that is forming
                    return await asyncio.wait_for(asyncio.shield(self.assembled_group), timeout=step.get_timeout())
                except asyncio.TimeoutError:
                    if not (self.was_accepted_to_group.is_set() or self.current_followers):
                        return None
                try:
                    return await asyncio.wait_for(asyncio.shield(self.assembled_group), timeout=self.request_timeout)
                except asyncio.TimeoutError:
                    return None
            except BaseException as e:
                if len(self.current_followers) > 0:
                    async with self.lock_request_join_group:
                        await self.leader_disband_group()
                if isinstance(e, asyncio.CancelledError):
                    self.assembled_group.cancel()  # as hivemind's unshielded wait did
                elif not self.assembled_group.done():
                    self.assembled_group.set_exception(e)
                raise
            finally:
                await cancel_and_wait(request_leaders_task)
                self.assembled_group.cancel()
                while len(self.current_followers) > 0:
                    await self.follower_was_discarded.wait()
                    self.follower_was_discarded.clear()
                self.assembled_group = asyncio.Future()
                self.was_accepted_to_group.clear()

    return look_for_group


def _target_group_size_property():
    """Matchmaking.target_group_size as a property: the size cap we set, or the group as it
    stands once every required follower is in it (see the module docstring)."""

    def get(self):
        cap = self.__dict__.get("_p2ptrain_target_group_size")
        required = self.__dict__.get("_p2ptrain_required")
        followers = self.__dict__.get("current_followers")
        if cap is None or required is None or not followers:
            return cap
        if required <= {peer.to_base58() for peer in followers}:
            return min(cap, len(followers) + 1)
        return cap

    def set(self, value):
        self.__dict__["_p2ptrain_target_group_size"] = value

    return property(get, set)


def apply() -> None:
    global _APPLIED
    if _APPLIED:
        return
    import hivemind.averaging.averager as averager_module
    import hivemind.dht.dht as dht_module
    from hivemind.averaging.key_manager import GroupKeyManager
    from hivemind.utils.asyncio import switch_to_uvloop

    def switch_to_uvloop_with_blocking_pipe():
        return _BlockingReaderLoop(switch_to_uvloop())

    import torch.multiprocessing
    import hivemind.utils.mpfuture  # noqa: F401  (sets the strategy we replace, on import)
    torch.multiprocessing.set_sharing_strategy(os.environ.get("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor"))
    dht_module.switch_to_uvloop = switch_to_uvloop_with_blocking_pipe
    averager_module.switch_to_uvloop = switch_to_uvloop_with_blocking_pipe
    GroupKeyManager.get_averagers = _throttled(GroupKeyManager.get_averagers)
    from hivemind.averaging.matchmaking import Matchmaking
    Matchmaking._check_reasons_to_reject = _admitting(Matchmaking._check_reasons_to_reject)
    Matchmaking._request_join_group = _joining_admitted_leaders_only(Matchmaking._request_join_group)
    Matchmaking.target_group_size = _target_group_size_property()
    Matchmaking.look_for_group = _waiting_out_a_forming_group()
    import hivemind.averaging.allreduce as allreduce_module
    from p2ptrain.swarm.wire_codec import deserialize_part
    allreduce_module.deserialize_torch_tensor = deserialize_part
    _APPLIED = True
