"""Everything that opens files: safetensors headers, tensor reads, shard and output writes."""
