"""The CPU kernels are compiled once per instruction set; the portable
variant (and AVX2, on an AVX-512 machine) must pass the same kernel tests as
the one this machine picks."""
import os
import subprocess
import sys

import pytest

import zerofuse

# Every test file that runs a CPU kernel (test_kernel_tests_are_all_listed keeps this complete).
KERNEL_TESTS = ["test_layer_norm.py", "test_attention.py", "test_adam.py", "test_grad_stats.py",
                "test_masked_softmax.py", "test_fused_ops.py"]
# Test files that run no CPU kernel of their own, or run the ones above through the engine.
NOT_KERNEL_TESTS = {"test_bindings.py", "test_build.py", "test_checkpoint.py", "test_cli.py", "test_compile.py",
                    "test_config.py", "test_cpu_variants.py", "test_deepspeed_compat.py", "test_deepspeed_import.py",
                    "test_engine_features.py",
                    "test_engine_surface.py",
                    "test_engine_zero.py",
                    "test_flat_plan.py", "test_gpu.py", "test_integrations.py", "test_loss_scaler.py",
                    "test_op_devices.py", "test_optimizers.py", "test_schedulers.py", "test_stateful.py",
                    "test_step_control.py", "test_threading.py", "test_zero3.py", "test_pipe.py",
                    "test_pipe_units.py", "test_tp.py"}


def test_kernel_tests_are_all_listed():
    # A new test file must be placed in one list or the other, so a kernel's
    # tests cannot be left out of the portable variant's run by omission.
    here = os.path.dirname(os.path.abspath(__file__))
    files = {f for f in os.listdir(here) if f.startswith("test_") and f.endswith(".py")}
    assert files - set(KERNEL_TESTS) - NOT_KERNEL_TESTS == set(), "add new test files to one of the lists"


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_narrower_variants_pass_the_kernel_tests(isa):
    # ZEROFUSE_CPU_ISA caps the variant: every one narrower than the one this
    # machine picks runs the kernel tests too (on an AVX-512 machine, AVX2 as well).
    info = zerofuse.build_info()
    if isa not in info["cpu_isas"] or isa == info["cpu_isa"]:
        pytest.skip(f"{isa} is not built, or is the variant the other tests already run")
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, ZEROFUSE_CPU_ISA=isa)
    check = subprocess.run([sys.executable, "-c", "import zerofuse; print(zerofuse.build_info()['cpu_isa'])"],
                           env=env, capture_output=True, text=True, check=True)
    if check.stdout.strip() != isa:
        pytest.skip(f"this processor cannot run the {isa} variant")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                             *[os.path.join(here, t) for t in KERNEL_TESTS]],
                            env=env, capture_output=True, text=True, cwd=here)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
