"""Dataset format (shards), global sample order and the DALI input pipeline."""
from selectivemae_ds.data.shards import ShardedDataset, ShardFormatError

__all__ = ["ShardedDataset", "ShardFormatError"]
