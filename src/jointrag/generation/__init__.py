"""Generation: the generator LM and its prompt templates (`generator`) and the RAG decoders (`decoding`)."""
