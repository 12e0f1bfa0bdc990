"""The part every faulty-peer script shares: join the run as `p2ptrain join` would, say
JOINED (the test waits for it), train until killed, and shut down if it ever gets there."""

from pathlib import Path

from p2ptrain.config import RunConfig
from p2ptrain.data.corpus import load_documents
from p2ptrain.swarm.join import JoinOptions, open_node


def join_and_train(home: str, config_file: str, path: str, initial_peer: str) -> None:
    config = RunConfig.load(config_file)
    docs = load_documents(None, 4096)
    opened = open_node(JoinOptions(initial_peers=[initial_peer], host_maddrs=["/ip4/127.0.0.1/tcp/0"], path=path,
                                   run_config=config, device="cpu"), Path(home), lambda: docs)
    opened.node.publish_status()
    print("JOINED", flush=True)
    try:
        opened.node.run(max_rounds=100)
    finally:
        opened.close()
