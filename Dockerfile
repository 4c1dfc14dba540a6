# GPU image for megatron_harpe: NVIDIA's PyTorch container (CUDA, cuDNN, NCCL, PyTorch,
# Transformer Engine, apex) + megatron-core 0.16.1 + this package.
#
#   docker build -t megatron_harpe:gpu .                          # from the repository root
#   docker build --build-arg NGC_TAG=25.04 -t megatron_harpe:gpu .  # another NGC release
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 --rm -it \
#       -v "$PWD/runs:/workspace/megatron_harpe/runs" -v /data:/data megatron_harpe:gpu \
#       torchrun --nproc-per-node 8 pretrain_harpe.py --config configs/llama2_7b_128k_harpe.yaml
#
# On Slurm with pyxis/enroot: `enroot import dockerd://megatron_harpe:gpu`, then
#   CONTAINER_IMAGE=$PWD/megatron_harpe+gpu.sqsh sbatch scripts/slurm/llama2_7b_128k_harpe.sbatch
#
# Not built or tested in CI: CI has no GPU, and the base image is ~20 GB. What CI does check
# is the CPU side of the same code (sdpa backend, launcher, planner). In this image set
# `model.attention_backend: te` to use Transformer Engine's attention, norms and context
# parallelism (megatron-core's TE layer spec; our per-head rotary stays, RoPE fusion off).
#
# NGC_TAG: any nvcr.io/nvidia/pytorch:<YY.MM>-py3 release with torch >= 2.6 and Transformer
# Engine 2.x works with megatron-core 0.16.1 (whose own test extra pins TE >= 2.9, < 2.12);
# 25.12 ships Python 3.12 and PyTorch 2.10 on CUDA 13.1 (driver >= 580 on the hosts).
ARG NGC_TAG=25.12
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}-py3

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1
WORKDIR /workspace/megatron_harpe

# The image's torch, Transformer Engine and apex must stay as NVIDIA built them: megatron-core is
# installed without its requirements (torch would be its only heavy one), then the light ones.
# pip honours the image's /etc/pip/constraint.txt, so packages the image ships keep their versions.
RUN pip install --no-cache-dir --no-deps megatron-core==0.16.1 \
 && pip install --no-cache-dir "packaging>=24.2" numpy pyyaml psutil sentencepiece tokenizers \
        "transformers>=5.4" safetensors zstandard tqdm matplotlib tensorboard pytest pytest-timeout

# The package, editable so mounted or edited sources take effect. --ignore-requires-python:
# pyproject.toml names the Python of the CPU development setup; NGC images ship another one.
COPY pyproject.toml README.md ./
COPY megatron_harpe ./megatron_harpe
RUN pip install --no-cache-dir --no-deps --ignore-requires-python -e .
COPY . .

# Fail the build, not the first job, when a piece is missing (no GPU is needed for these).
RUN python -c "import importlib.util as u, megatron.core, megatron_harpe; \
assert u.find_spec('transformer_engine'), 'the base image has no Transformer Engine'; \
print('megatron-core', megatron.core.__version__)"

CMD ["bash"]
