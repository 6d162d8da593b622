import json
import os
import subprocess
import sys

import zerofuse


def test_build_info_reports_what_was_compiled():
    info = zerofuse.build_info()
    assert info["version"] == zerofuse.__version__
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert set(info["cuda_archs"].split(",")) >= {"80", "90"}
    assert "baseline" in info["cpu_isas"] and info["cpu_isa"] in info["cpu_isas"]
    assert info["cpu_threads"] >= 1
    assert info["torch"].split("+")[0] == __import__("torch").__version__.split("+")[0]


def test_env_command_prints_table_and_json():
    out = subprocess.run([sys.executable, "-m", "zerofuse", "env"], capture_output=True, text=True, check=True)
    assert "zerofuse" in out.stdout and "CUDA kernels" in out.stdout
    js = subprocess.run([sys.executable, "-m", "zerofuse", "env", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(js.stdout)["version"] == zerofuse.__version__


def test_import_without_torch_or_gpu():
    # The core must import and run where torch is absent: block its import.
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import zerofuse, numpy as np\n"
        "s = zerofuse.DynamicLossScaler(); assert s.loss_scale == 65536\n"
        "out = np.zeros(2, np.float32); zerofuse._C.grad_stats([np.ones(5, np.float32)], out)\n"
        "assert out[0] == 5 and out[1] == 0\n"
        "print(zerofuse.build_info()['torch'])\n"
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None"


def test_cmake_prefix_points_at_the_cmake_package():
    prefix = zerofuse._build.cmake_prefix_path()
    assert os.path.isfile(os.path.join(prefix, "lib", "cmake", "zerofuse", "zerofuseConfig.cmake"))
    assert os.path.isfile(os.path.join(prefix, "include", "zerofuse", "zerofuse.h"))


def test_thread_count_can_be_set():
    before = zerofuse.get_num_threads()
    try:
        zerofuse.set_num_threads(1)
        assert zerofuse.get_num_threads() == 1
    finally:
        zerofuse.set_num_threads(before)


def _quoted_includes(path):
    with open(path) as f:
        return [line.split('"')[1] for line in f if line.startswith("#include \"")]


def test_kernel_trees_include_only_public_and_shared_headers():
    # cuda/ and cpp/src/ meet only in cpp/common/ (and the public cpp/include/):
    # no CUDA file includes a private header of cpp/src, and no file of cpp/src
    # a header of cuda/. The build enforces it too (per-language include paths).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(root, "cuda")):
        return  # an installed copy of the tests without the sources
    cuda_headers = {f for _, _, files in os.walk(os.path.join(root, "cuda")) for f in files if f.endswith(".cuh")}
    src_headers = {f for _, _, files in os.walk(os.path.join(root, "cpp", "src")) for f in files if f.endswith(".h")}
    src_headers |= {"cpu/" + f for f in os.listdir(os.path.join(root, "cpp", "src", "cpu")) if f.endswith(".h")}
    wrong = []
    for tree, foreign, allowed_prefixes in (("cuda", src_headers, ("zerofuse/", "common/")),
                                            (os.path.join("cpp", "src"), cuda_headers, None)):
        for dirpath, _, files in os.walk(os.path.join(root, tree)):
            for name in files:
                path = os.path.join(dirpath, name)
                for inc in _quoted_includes(path):
                    own = os.path.exists(os.path.join(dirpath, inc)) or inc in cuda_headers
                    if inc in foreign or (allowed_prefixes and not own and not inc.startswith(allowed_prefixes)):
                        wrong.append(f"{os.path.relpath(path, root)} includes {inc}")
    for dirpath, _, files in os.walk(os.path.join(root, "cpp", "common")):
        for name in files:
            for inc in _quoted_includes(os.path.join(dirpath, name)):
                if not inc.startswith(("zerofuse/", "common/")):
                    wrong.append(f"cpp/common/{name} includes {inc}")
    assert wrong == []
