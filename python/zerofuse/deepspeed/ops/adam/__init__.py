"""deepspeed.ops.adam: FusedAdam and DeepSpeedCPUAdam are zerofuse's FusedAdam
(one compiled kernel on CPU and GPU), with DeepSpeed's argument names and order."""
from ....optim import FusedAdam as _ZerofuseAdam


class FusedAdam(_ZerofuseAdam):
    """DeepSpeed's FusedAdam: AdamW unless adam_w_mode is False. amsgrad is not
    supported (as in DeepSpeed's); set_grad_none is accepted (zero_grad sets
    gradients to None, torch's default)."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, adam_w_mode=True,
                 weight_decay=0.0, amsgrad=False, set_grad_none=True):
        if amsgrad:
            raise RuntimeError("FusedAdam does not support the AMSGrad variant (as in DeepSpeed)")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adam_w_mode=adam_w_mode,
                         bias_correction=bias_correction)


class DeepSpeedCPUAdam(_ZerofuseAdam):
    """DeepSpeed's CPU Adam, here zerofuse's CPU kernel (the same class runs on a
    GPU too). fp32_optimizer_states=False is not supported: the state is kept
    in the parameters' dtype, float32 for float32 parameters."""

    def __init__(self, model_params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, adamw_mode=True, fp32_optimizer_states=True):
        if amsgrad:
            raise RuntimeError("DeepSpeedCPUAdam does not support the AMSGrad variant (as in DeepSpeed)")
        super().__init__(model_params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adam_w_mode=adamw_mode,
                         bias_correction=bias_correction)


__all__ = ["DeepSpeedCPUAdam", "FusedAdam"]
