# One image for every service; the command picks which (`snap2caption serve <name>`).
# Not built in this repository's CI: the build machines have no Docker engine (only the client).
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 YOLO_OFFLINE=1
RUN apt-get update && apt-get install -y --no-install-recommends default-jre-headless git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# CPU wheels of the pinned torch keep the image small; a GPU image uses the CUDA wheels and the `gpu` extra.
RUN pip install "torch==2.14.1" "torchvision==0.29.1" --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY snap2caption ./snap2caption
COPY services ./services
COPY training ./training
RUN pip install ".[serve,train]"
RUN useradd --create-home --uid 1000 app && mkdir -p /app/var /app/data && chown -R app /app/var /app/data
USER app
EXPOSE 8000 8001 8002 8003
CMD ["snap2caption", "serve", "etl", "--host", "0.0.0.0"]
