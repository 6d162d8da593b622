"""deepspeed.accelerator.get_accelerator(): the device API DeepSpeed scripts
call (device names, counts, streams, RNG, memory statistics, the
communication backend), for CUDA and the CPU.

The CUDA one is chosen when torch sees a GPU, unless ZEROFUSE_DEVICE=cpu or
DS_ACCELERATOR=cpu asks for the CPU (as DeepSpeed's DS_ACCELERATOR does). On
the CPU the communication backend is gloo (DeepSpeed's CPU accelerator uses
oneCCL) and memory figures are the process's.
"""
import contextlib
import os

import torch


class _Accelerator:
    _name = None
    _communication_backend_name = None

    # --- devices ------------------------------------------------------------------------------

    def device_name(self, device_index=None):
        return self._name if device_index is None else f"{self._name}:{device_index}"

    def device(self, device_index=None):
        return torch.device(self._name, device_index) if device_index is not None else torch.device(self._name)

    def communication_backend_name(self):
        return self._communication_backend_name

    def is_synchronized_device(self):
        return self._name == "cpu"

    def use_host_timers(self):
        return self.is_synchronized_device()

    def resolves_data_dependency(self):
        return self.is_synchronized_device()

    def handles_memory_backpressure(self):
        return self.is_synchronized_device()

    def on_accelerator(self, tensor):
        return tensor.device.type == self._name

    def supported_dtypes(self):
        return [torch.float32, torch.float16, torch.bfloat16]

    def is_fp16_supported(self):
        return True

    def is_bf16_supported(self):
        return True

    def is_fp64_supported(self):
        return True

    def is_triton_supported(self):
        return False

    # --- random numbers -------------------------------------------------------------------------

    def manual_seed(self, seed):
        torch.manual_seed(seed)

    def manual_seed_all(self, seed):
        torch.manual_seed(seed)

    def initial_seed(self):
        return torch.initial_seed()

    def random(self):
        return torch.random

    def get_rng_state(self, device_index=None):
        return torch.get_rng_state()

    def set_rng_state(self, new_state, device_index=None):
        torch.set_rng_state(new_state)

    @property
    def default_generator(self):
        return torch.default_generator

    # --- tracing and graphs --------------------------------------------------------------------

    def range_push(self, msg):
        pass

    def range_pop(self):
        pass

    def lazy_call(self, callback):
        callback()

    def is_current_stream_capturing(self):
        return False

    # --- pinned memory --------------------------------------------------------------------------

    def pin_memory(self, tensor, align_bytes=1):
        return tensor.pin_memory() if torch.cuda.is_available() else tensor

    def is_pinned(self, tensor):
        return tensor.is_pinned()

    def pin_memory_alignment(self):
        return 1

    def visible_devices_envs(self):
        return ["CUDA_VISIBLE_DEVICES"]

    def set_visible_devices_envs(self, current_env, local_accelerator_ids):
        for env in self.visible_devices_envs():
            current_env[env] = ",".join(map(str, local_accelerator_ids))

    def export_envs(self):
        return ["NCCL"]


class CUDA_Accelerator(_Accelerator):
    _name = "cuda"
    _communication_backend_name = "nccl"

    def is_available(self):
        return torch.cuda.is_available()

    def set_device(self, device_index):
        torch.cuda.set_device(device_index)

    def current_device(self):
        return torch.cuda.current_device()

    def current_device_name(self):
        return f"cuda:{torch.cuda.current_device()}"

    def device_count(self):
        return torch.cuda.device_count()

    def synchronize(self, device_index=None):
        return torch.cuda.synchronize(device_index)

    def manual_seed_all(self, seed):
        torch.cuda.manual_seed_all(seed)

    def get_rng_state(self, device_index=None):
        return torch.cuda.get_rng_state(device_index if device_index is not None else "cuda")

    def set_rng_state(self, new_state, device_index=None):
        torch.cuda.set_rng_state(new_state, device_index if device_index is not None else "cuda")

    def stream(self, stream):
        return torch.cuda.stream(stream)

    def current_stream(self, device_index=None):
        return torch.cuda.current_stream(device_index)

    def default_stream(self, device_index=None):
        return torch.cuda.default_stream(device_index)

    @property
    def Stream(self):
        return torch.cuda.Stream

    @property
    def Event(self):
        return torch.cuda.Event

    def empty_cache(self):
        torch.cuda.empty_cache()

    def memory_allocated(self, device_index=None):
        return torch.cuda.memory_allocated(device_index)

    def max_memory_allocated(self, device_index=None):
        return torch.cuda.max_memory_allocated(device_index)

    def reset_max_memory_allocated(self, device_index=None):
        torch.cuda.reset_peak_memory_stats(device_index)

    def memory_cached(self, device_index=None):
        return torch.cuda.memory_reserved(device_index)

    def max_memory_cached(self, device_index=None):
        return torch.cuda.max_memory_reserved(device_index)

    def reset_max_memory_cached(self, device_index=None):
        torch.cuda.reset_peak_memory_stats(device_index)

    def memory_reserved(self, device_index=None):
        return torch.cuda.memory_reserved(device_index)

    def max_memory_reserved(self, device_index=None):
        return torch.cuda.max_memory_reserved(device_index)

    def memory_stats(self, device_index=None):
        return torch.cuda.memory_stats(device_index)

    def reset_peak_memory_stats(self, device_index=None):
        torch.cuda.reset_peak_memory_stats(device_index)

    def total_memory(self, device_index=None):
        return torch.cuda.get_device_properties(device_index or 0).total_memory

    def available_memory(self, device_index=None):
        return torch.cuda.mem_get_info(device_index)[0]

    def is_bf16_supported(self):
        return torch.cuda.is_bf16_supported()

    def range_push(self, msg):
        torch.cuda.nvtx.range_push(msg)

    def range_pop(self):
        torch.cuda.nvtx.range_pop()

    def lazy_call(self, callback):
        torch.cuda._lazy_call(callback)

    def is_current_stream_capturing(self):
        return torch.cuda.is_current_stream_capturing()

    def create_graph(self):
        return torch.cuda.CUDAGraph()

    def capture_to_graph(self, graph, pool=None, stream=None):
        return torch.cuda.graph(graph, pool, stream)

    def replay_graph(self, graph):
        graph.replay()


def _rss():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class CPU_Accelerator(_Accelerator):
    _name = "cpu"
    _communication_backend_name = "gloo"

    def __init__(self):
        self._peak = 0

    def is_available(self):
        return True

    def set_device(self, device_index):
        pass  # one CPU device

    def current_device(self):
        return int(os.environ.get("LOCAL_RANK", "0"))

    def current_device_name(self):
        return "cpu"

    def device(self, device_index=None):
        return torch.device("cpu")

    def device_name(self, device_index=None):
        return "cpu"

    def device_count(self):
        return int(os.environ.get("LOCAL_SIZE", "1"))

    def synchronize(self, device_index=None):
        pass

    def stream(self, stream):
        return contextlib.nullcontext()

    def current_stream(self, device_index=None):
        return None

    def default_stream(self, device_index=None):
        return None

    def empty_cache(self):
        pass

    def memory_allocated(self, device_index=None):
        used = _rss()
        self._peak = max(self._peak, used)
        return used

    def max_memory_allocated(self, device_index=None):
        return max(self._peak, self.memory_allocated())

    def reset_max_memory_allocated(self, device_index=None):
        self._peak = 0

    memory_cached = memory_reserved = memory_allocated
    max_memory_cached = max_memory_reserved = max_memory_allocated
    reset_max_memory_cached = reset_peak_memory_stats = reset_max_memory_allocated

    def memory_stats(self, device_index=None):
        return {"allocated_bytes.all.current": self.memory_allocated(),
                "allocated_bytes.all.peak": self.max_memory_allocated()}

    def total_memory(self, device_index=None):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def available_memory(self, device_index=None):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")

    def visible_devices_envs(self):
        return []


_accelerator = None


def get_accelerator():
    global _accelerator
    if _accelerator is None:
        wanted = (os.environ.get("ZEROFUSE_DEVICE") or os.environ.get("DS_ACCELERATOR") or "").strip().lower()
        _accelerator = CPU_Accelerator() if wanted == "cpu" or not torch.cuda.is_available() else CUDA_Accelerator()
    return _accelerator


def set_accelerator(accelerator):
    global _accelerator
    _accelerator = accelerator


def is_current_accelerator_supported():
    return True
