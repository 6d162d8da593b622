"""The CPU kernels are compiled once per instruction set; the portable
variant must pass the same kernel tests as the one this machine picks."""
import os
import subprocess
import sys

import pytest

import zerofuse

KERNEL_TESTS = ["test_layer_norm.py", "test_attention.py", "test_adam.py", "test_grad_stats.py",
                "test_masked_softmax.py"]


@pytest.mark.skipif(zerofuse.build_info()["cpu_isas"] == ["baseline"], reason="only the portable variant is built")
def test_portable_variant_passes_the_kernel_tests():
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, ZEROFUSE_CPU_ISA="baseline")
    check = subprocess.run([sys.executable, "-c", "import zerofuse; print(zerofuse.build_info()['cpu_isa'])"],
                           env=env, capture_output=True, text=True, check=True)
    assert check.stdout.strip() == "baseline"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                             *[os.path.join(here, t) for t in KERNEL_TESTS]],
                            env=env, capture_output=True, text=True, cwd=here)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
