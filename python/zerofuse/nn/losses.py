import torch

from ..ops.cross_entropy import cross_entropy, linear_cross_entropy


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Drop-in for torch.nn.CrossEntropyLoss with class targets and 2-D logits
    [N, V] (or [..., V], flattened), on zerofuse's one-pass kernel. Per-class
    weights are not supported. The loss is float32."""

    inplace_backward = False  # also for modules swapped in by zerofuse.optimize

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                 label_smoothing=0.0, inplace_backward=False):
        if weight is not None:
            raise ValueError("zerofuse.nn.CrossEntropyLoss: per-class 'weight' is not supported")
        super().__init__(None, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.inplace_backward = inplace_backward

    def forward(self, input, target):
        logits = input.reshape(-1, input.shape[-1])
        loss = cross_entropy(logits, target.reshape(-1), ignore_index=self.ignore_index, reduction=self.reduction,
                             label_smoothing=self.label_smoothing, inplace_backward=self.inplace_backward)
        return loss.view(target.shape) if self.reduction == "none" else loss


class LinearCrossEntropy(torch.nn.Module):
    """A language-model head and its loss in one: forward(hidden [..., D],
    target [...]) = cross_entropy(hidden @ weight.T + bias, target), without
    the [N, V] logits (see zerofuse.ops.linear_cross_entropy). `weight` can be
    tied to an embedding: head.weight = embedding.weight."""

    def __init__(self, in_features, num_classes, bias=False, ignore_index=-100, reduction="mean", chunk_size=None,
                 device=None, dtype=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(num_classes, in_features, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(num_classes, device=device, dtype=dtype)) if bias else None
        self.ignore_index, self.reduction, self.chunk_size = ignore_index, reduction, chunk_size
        torch.nn.init.normal_(self.weight, std=in_features ** -0.5)

    def forward(self, hidden, target):
        return linear_cross_entropy(hidden, self.weight, target, bias=self.bias, ignore_index=self.ignore_index,
                                    reduction=self.reduction, chunk_size=self.chunk_size)

    def logits(self, hidden):
        """The plain head, for generation."""
        return torch.nn.functional.linear(hidden, self.weight, self.bias)
