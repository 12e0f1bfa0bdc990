"""How a round's averaging outcomes are shown to users: the fields `join --json` events
carry and the one-line summary the console and the daemon's log print. Pure functions of
`ModuleRound`s (node.py), so the CLI and the daemon say the same thing."""

from __future__ import annotations


def peers_text(modules: dict) -> str:
    """'stem:2  L0.M1:1': how many peers (us included) averaged each module."""
    return "  ".join(f"{m}:{len(r.group) if r.group else 1}" for m, r in modules.items())


def averaging_fields(modules: dict) -> dict:
    """A round's (or a landing's) averaging outcomes, as `join --json` events carry them."""
    return {
        "peers_per_module": {m: (len(r.group) if r.group else 1) for m, r in modules.items()},
        "resynced": [m for m, r in modules.items() if r.resynced_from],
        "partial": [m for m, r in modules.items() if r.partial],
        # modules whose holders disagreed with no majority, healed toward each other
        "healed": [m for m, r in modules.items() if r.healed_with],
        # tensor-part bytes this node's averagers sent (the codec's payload, no framing)
        "bytes_sent_per_module": {m: r.bytes_sent for m, r in modules.items()},
        # modules averaged in two stages (more holders than a group holds): each stage's group
        "stage_groups": {m: r.stage_groups for m, r in modules.items() if r.stage_groups},
        # measured by the averager: asking for a group until it formed, then the all-reduce
        # (modules that did not average this round are left out)
        "seconds_matchmaking_per_module": {m: r.seconds_matchmaking for m, r in modules.items()
                                           if r.seconds_matchmaking is not None},
        "seconds_allreduce_per_module": {m: r.seconds_allreduce for m, r in modules.items()
                                         if r.seconds_allreduce is not None},
        # the all-reduce's chunk timeout (a sender silent this long is left out; a reducer gets
        # twice it) and the longest wait this node had for a sender's next part and for a
        # reducer's next average: how close the round came to leaving someone out
        "chunk_waits_per_module": {m: {"timeout_s": r.chunk_timeout, "sender_s": r.longest_sender_wait,
                                       "reducer_s": r.longest_reducer_wait}
                                   for m, r in modules.items() if r.chunk_timeout is not None},
    }
