"""Put on PYTHONPATH by tests only: DeepSpeed's CPU accelerator then accepts fp16 on CPUs without AVX512-FP16/AMX.

DeepSpeed allows fp16 on a CPU only when oneDNN has an fp16 fast path (`torch.ops.mkldnn._is_mkldnn_fp16_supported`).
torch computes fp16 on any CPU with its reference kernels, only slower, so with this flag lifted a CPU test runs
DeepSpeed's real fp16 machinery: half-precision module, fp32 master weights in ZeRO, dynamic loss scaling and
overflow skips.
"""
from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

CPU_Accelerator.is_fp16_supported = lambda self: True
