"""Tensor files and outputs: safetensors headers, the reader, the streaming writer, the output
directory and its state, and the names of every file of the layouts (`names`)."""
