"""A worker for test_launch: rank 1 fails while rank 0 waits in a collective."""

import torch.distributed as dist

from xlstm_train.parallel import init_distributed, run_on_every_rank, setup_rank_logging


def main() -> None:
    env = init_distributed(timeout_s=120, device_type="cpu")
    setup_rank_logging(env.rank)
    if env.rank == 1:
        raise ValueError("shard 7 is corrupt")
    dist.barrier()  # never completes: rank 1 is gone


if __name__ == "__main__":
    run_on_every_rank(main)
