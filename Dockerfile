# S2-Megatron on the NGC PyTorch image, which already holds CUDA, NCCL, torch, Triton, apex and
# Transformer Engine built for each other. Build:  docker build -t s2megatron .
# Other base release:  docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:<yy.mm>-py3 -t s2megatron .
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /workspace/s2megatron

# Keep the base image's torch (and everything else in it): a PyPI torch would replace NVIDIA's build
# and break apex/Transformer Engine. The other dependencies (pyproject.toml minus torch and triton) are
# installed against a constraints file that pins every package already in the image, so pip only adds
# what is missing and never swaps a package (NGC >= 25.03 also ships /etc/pip/constraint.txt; this
# file covers older BASE_IMAGE values too). A conflict fails the build instead of changing torch.
RUN pip list --format=freeze > /tmp/base-constraints.txt \
    && pip install --no-cache-dir --constraint /tmp/base-constraints.txt \
        "megatron-core>=0.16.1" \
        "hydra-core>=1.3" \
        "omegaconf>=2.3" \
        "sentencepiece>=0.2" \
        "tensorboard>=2.15" \
        "psutil>=5.9" \
        numpy

COPY . .

# The project itself with --no-deps: its torch/triton requirements are met by the base image's builds.
# --no-build-isolation builds with the image's setuptools (the pyproject.toml backend) instead of
# fetching one, which the image's pip constraints could otherwise reject.
RUN pip install --no-cache-dir --no-deps --no-build-isolation .

CMD ["python", "train.py"]
