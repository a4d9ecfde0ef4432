"""A tiny checkpoint and one real local Serve application for the serving tests (package scope)."""

import pytest
import torch

from dimoe.infer.engine import GenerationEngine
from dimoe.io import free_ports
from dimoe.serving.server import start_server_background
from tests.serve.support import API_KEY, LIMITS, MODEL


@pytest.fixture(scope="package")
def server(ray_cluster, checkpoint):
    http_port, grpc_port = free_ports(2)
    running = start_server_background(
        checkpoint,
        http_port=http_port,
        grpc_port=grpc_port,
        api_key=API_KEY,
        model_name=MODEL,
        # A long wait so that requests sent together surely share a batch on a busy machine.
        batching={"max_batch_size": 8, "batch_wait_timeout_s": 0.25},
        limits=LIMITS,
    )
    yield running
    running.stop()


@pytest.fixture(scope="package")
def engine(checkpoint):
    """The same checkpoint decoded in this process, single-threaded like the replica."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield GenerationEngine.from_checkpoint(checkpoint)
    torch.set_num_threads(previous)
