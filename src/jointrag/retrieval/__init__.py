"""Retrieval: the encoders and bi-encoder (`encoders`), indexes (`index`), the sharded index of a
torchrun build (`sharded`), and opening an index by name (`resolve`)."""
