"""Bytes alive of the tensors a weights iterator hands out: the structural memory check of a weight sync."""

import weakref


class LiveBytes:
    """`track(weights)` passes (name, tensor) pairs through; `peak` is the largest total of bytes of the
    tensors passed so far that were still alive (referenced by anyone) when the next one came, and
    `count` how many passed. A tensor counts from when it is handed out until it is freed."""

    def __init__(self):
        self.live, self.peak, self.count = {}, 0, 0

    def track(self, weights):
        for name, tensor in weights:
            key, self.count = self.count, self.count + 1
            self.live[key] = tensor.numel() * tensor.element_size()
            weakref.finalize(tensor, self.live.pop, key)
            self.peak = max(self.peak, sum(self.live.values()))
            yield name, tensor
