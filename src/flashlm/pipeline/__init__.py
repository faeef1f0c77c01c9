"""The engine: requests, the sparse token step, layer actors, neuron caches, the memory budget,
selection, sampling, streams and trace writing."""
