"""Layer 2, replies from a model: sampling settings, batched and streamed generation, and the
logits processor that never lets a reply end inside a character."""
