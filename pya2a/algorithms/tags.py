"""Message tags on pya2a's private communicator, one table for every algorithm.

Each call completes all its messages before it returns and MPI does not overtake on one
(source, tag, communicator), so one tag per algorithm is enough; distinct values keep traces
readable and keep a bound plan's messages apart from an algorithm's own.
"""

__all__ = ["TAG_DIRECT", "TAG_PAIRWISE", "TAG_RING", "TAG_MESH", "TAG_HYPERCUBE", "TAG_META",
           "TAG_BOUND", "TAG_STAMP"]

TAG_DIRECT = 7101
TAG_PAIRWISE = 7102
TAG_RING = 7103
TAG_MESH = 7104
TAG_HYPERCUBE = 7105
TAG_META = 7106  # block sizes sent ahead of store-and-forward payloads
TAG_BOUND = 7120  # bound store-and-forward schedules (plans)
TAG_STAMP = 7130  # one-shot calls' stamped messages (agreement folded into the exchange)
