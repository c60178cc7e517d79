# Snap2Caption's images: one Dockerfile, one target per image. `make images` (scripts/images.sh) builds them;
# docker-compose.yml runs them.
#
#   serving     gateway, captioner and detector (the command picks which): ONNX Runtime, no torch
#   etl         the ETL service: the serving image plus pyarrow (Parquet), one layer on top of it
#   training    training, evaluation, export and `snap2caption bootstrap`: the serving code plus torch
#   mlflow      the MLflow tracking server: registry and artifact proxy, its store in Postgres
#   postgres    PostgreSQL 15 (Debian's), for MLflow and the gateway's inference log
#   prometheus  Prometheus (Debian's); the compose file mounts infra/prometheus
#
# BASE_IMAGE: a Debian bookworm image with Python 3.11 and its venv module. python:3.11-slim-bookworm where
# a registry is reachable; scripts/images.sh builds the same thing with mmdebstrap from Debian's packages
# where none is. Build stages install; final stages get only what runs (no compilers, no pip cache, and
# pip itself only in the training image), run as a non-root user, and say how to check their health.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ------------------------------------------------------------------------------------------------ python
FROM ${BASE_IMAGE} AS python
# The dependencies in a venv, the project beside it (its own layer: see `project` below).
ENV PATH=/opt/snap2caption/bin:/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/snap2caption \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SNAP2CAPTION_HOME=/var/lib/snap2caption
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /var/lib/snap2caption --create-home app

# --------------------------------------------------------------------------- dependencies (cached layers)
# Keyed on pyproject.toml alone (scripts/requirements.py reads it), so a code change leaves them cached.
# pyarrow (~170 MB) is left out: only the ETL (and training) read or write Parquet; the gateway and the
# model services never import it (tests/containers/test_images.py holds them to that).
FROM python AS deps
COPY scripts/requirements.py pyproject.toml infra/containers/pip.sh /build/
RUN python3 -m venv /opt/venv
RUN --mount=type=secret,id=ca-bundle \
    python3 /build/requirements.py /build/pyproject.toml --exclude pyarrow serve postgres > /build/serve.txt \
    && /build/pip.sh install -r /build/serve.txt

# pyarrow for the ETL image, in a folder of its own that the etl stage copies on top of the serving image.
FROM deps AS deps-etl
RUN --mount=type=secret,id=ca-bundle \
    python3 /build/requirements.py /build/pyproject.toml --only pyarrow > /build/etl.txt \
    && /build/pip.sh install --no-deps --target /opt/etl-packages -r /build/etl.txt

FROM deps AS deps-serving
RUN /build/pip.sh uninstall --yes pip setuptools

# torch comes from TORCH_INDEX_URL when set (e.g. https://download.pytorch.org/whl/cpu: CPU-only, a few
# GB smaller), else from PyPI (the CUDA build, for GPU nodes). Wheels in infra/containers/wheels win
# over both (scripts/images.sh fills it from the host's pip sources, so nothing is downloaded twice).
# Ultralytics requires opencv-python, whose cv2 links X11 and OpenGL libraries a server has no use for:
# the headless build of the same version is the same cv2 without them.
FROM deps AS deps-training
ARG TORCH_INDEX_URL=
RUN --mount=type=secret,id=ca-bundle \
    --mount=type=bind,source=infra/containers/wheels,target=/wheels \
    python3 /build/requirements.py /build/pyproject.toml train data > /build/train.txt \
    && if [ -n "$TORCH_INDEX_URL" ]; then \
         python3 /build/requirements.py /build/pyproject.toml --only torch,torchvision train > /build/torch.txt \
         && /build/pip.sh install --index-url "$TORCH_INDEX_URL" -r /build/torch.txt; \
       fi \
    && /build/pip.sh install --find-links /wheels -r /build/train.txt \
    && opencv=$(python3 -c "import importlib.metadata as m; print(m.version('opencv-python'))") \
    && /build/pip.sh uninstall --yes opencv-python \
    && /build/pip.sh install "opencv-python-headless==$opencv"

# The project's own files (a few MB) in a folder of their own: a code change rebuilds this layer only,
# never the hundreds of MB (GB, for training) of dependencies copied into the images before it.
FROM deps AS project
COPY README.md /build/src/
COPY snap2caption /build/src/snap2caption
COPY services /build/src/services
COPY training /build/src/training
RUN --mount=type=secret,id=ca-bundle \
    cp /build/pyproject.toml /build/src/ \
    && /build/pip.sh install --no-deps --target /opt/snap2caption /build/src

# -------------------------------------------------------------------------------------------------- serving
FROM python AS serving
COPY --from=deps-serving /opt/venv /opt/venv
COPY --from=project /opt/snap2caption /opt/snap2caption
WORKDIR /var/lib/snap2caption
USER app
EXPOSE 8000 8001 8002
# Liveness of whichever service runs; the compose file points it at each service's port.
ENV SNAP2CAPTION_HEALTHCHECK_URL=http://127.0.0.1:8000/healthz
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['SNAP2CAPTION_HEALTHCHECK_URL'], timeout=4)"]
CMD ["snap2caption", "serve", "gateway", "--host", "0.0.0.0"]

# ------------------------------------------------------------------------------------------------------ etl
# The serving image and one more layer: its layers are shared on disk and in a registry.
FROM serving AS etl
COPY --from=deps-etl /opt/etl-packages /opt/etl-packages
ENV PYTHONPATH=/opt/snap2caption:/opt/etl-packages \
    SNAP2CAPTION_HEALTHCHECK_URL=http://127.0.0.1:8003/healthz
USER app
EXPOSE 8003
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['SNAP2CAPTION_HEALTHCHECK_URL'], timeout=4)"]
CMD ["snap2caption", "serve", "etl", "--host", "0.0.0.0", "--port", "8003"]

# ------------------------------------------------------------------------------------------------- training
# On the dependency stage itself, not a copy of its venv: that is ~8 GB (torch's CUDA libraries), and a
# copy would double the disk a build needs. pip stays, for jobs that add a package.
FROM deps-training AS training
# Java for METEOR (pycocoevalcap), git for DVC and the runs' commit tag. (Java's package links its man
# page into man1/, which slim bases leave out.)
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install --yes --no-install-recommends default-jre-headless git \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*
COPY --from=project /opt/snap2caption /opt/snap2caption
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 YOLO_OFFLINE=1 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
WORKDIR /var/lib/snap2caption
USER app
CMD ["snap2caption", "--help"]

# --------------------------------------------------------------------------------------------------- mlflow
FROM python AS build-mlflow
COPY scripts/requirements.py pyproject.toml infra/containers/pip.sh /build/
RUN --mount=type=secret,id=ca-bundle \
    python3 -m venv /opt/venv \
    && python3 /build/requirements.py /build/pyproject.toml --no-core --only mlflow,psycopg train postgres \
       > /build/mlflow.txt \
    && /build/pip.sh install -r /build/mlflow.txt \
    && /build/pip.sh uninstall --yes pip

FROM python AS mlflow
COPY --from=build-mlflow /opt/venv /opt/venv
# A registry and artifact proxy runs no server-side jobs: without this, MLflow 3 starts a job runner and
# seven huey consumers beside the web workers (measured: ~650 MB more, and OOM-killed under a 1.5 GB limit).
ENV MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
WORKDIR /var/lib/snap2caption
USER app
EXPOSE 5000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
ENTRYPOINT ["mlflow", "server"]
CMD ["--host", "0.0.0.0", "--port", "5000"]

# ------------------------------------------------------------------------------------------------- postgres
FROM ${BASE_IMAGE} AS postgres
RUN apt-get update \
    && apt-get install --yes --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/lib/postgresql/15 /etc/postgresql/15 \
    && install --directory --owner=postgres --group=postgres --mode=700 /var/lib/postgresql/data
COPY infra/containers/postgres-entrypoint.sh /usr/local/bin/
ENV PGDATA=/var/lib/postgresql/data
USER postgres
EXPOSE 5432
HEALTHCHECK --interval=5s --timeout=5s --start-period=30s --retries=5 \
    CMD ["pg_isready", "--host=127.0.0.1", "--port=5432"]
ENTRYPOINT ["postgres-entrypoint.sh"]

# ----------------------------------------------------------------------------------------------- prometheus
# Debian's package links its web UI to whole libjs packages (218 MB of moment-timezone variants alone): the
# image gets the binary and the files the UI loads.
FROM ${BASE_IMAGE} AS build-prometheus
RUN apt-get update \
    && apt-get install --yes --no-install-recommends prometheus \
    && cp -rL /usr/share/prometheus/web /web \
    && find /web/static/moment-timezone -type f ! -name moment-timezone-with-data.min.js -delete

FROM ${BASE_IMAGE} AS prometheus
COPY --from=build-prometheus /usr/bin/prometheus /usr/bin/prometheus
COPY --from=build-prometheus /web /usr/share/prometheus/web
RUN useradd --system --user-group --home-dir /prometheus prometheus \
    && install --directory --owner=prometheus --group=prometheus /prometheus
USER prometheus
EXPOSE 9090
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/-/healthy', timeout=4)"]
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
