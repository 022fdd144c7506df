# Sourced by the GPU run scripts (run_2gpu.sh, run_prefix.sh) from the repository root: the environment of a
# lent GPU machine. NVLink multicast stays off everywhere (NCCL, PyTorch symmetric memory, NVSHMEM). The GPU
# image lacks DeepSpeed (and has other versions of the rest): the project's wheels travel in .whl (carried by
# the device call), installed once per machine into /tmp/site, ahead of the image's packages.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMMMEM=CUDA
export PYTHONUNBUFFERED=1
if [ -d .whl ] && [ ! -d /tmp/site/deepspeed ] && ! python3 -c "import deepspeed" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "wheel install failed"; exit 1; }
fi
[ -d /tmp/site ] && export PATH="/tmp/site/bin:$PATH" PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
