# One image for the three services (frontend, scheduler, worker); docker-compose.yml runs it.
#
# BASE_IMAGE is any Debian-like image with python3 (3.10+) and its venv module. The default
# suits GPU hosts: torch from PyPI is the CUDA build and brings the CUDA runtime with it, so
# the host needs only the NVIDIA driver and the NVIDIA Container Toolkit. CI builds a local
# base (scripts/compose_test.sh) and puts wheels in docker/wheelhouse/: when that folder
# holds wheels, the build installs from it alone (no index: it works without network).
ARG BASE_IMAGE=python:3.11-slim-bookworm

# The dependencies alone, at requirements.lock's versions: a layer that source changes
# leave cached. pyproject.toml without the packages builds an empty project whose only
# effect is to install its dependencies. (The project stage builds on this one rather than
# copying the 1 GB venv out of it, which took minutes; the price is that wheels given in
# docker/wheelhouse/ stay in a layer of the image.)
FROM ${BASE_IMAGE} AS dependencies
COPY docker/wheelhouse/ /wheelhouse/
COPY pyproject.toml requirements.lock /deps/
RUN set -eu; \
    python3 -m venv /opt/loraserve; \
    if ls /wheelhouse/*.whl >/dev/null 2>&1; then set -- --no-index --find-links /wheelhouse; else set --; fi; \
    /opt/loraserve/bin/pip install --no-cache-dir --disable-pip-version-check "$@" \
        --constraint /deps/requirements.lock /deps "setuptools>=68"; \
    /opt/loraserve/bin/pip uninstall --yes --disable-pip-version-check loraserve

FROM dependencies
COPY pyproject.toml /src/
COPY protos /src/protos
COPY frontend /src/frontend
COPY scheduler /src/scheduler
COPY worker /src/worker
COPY loraserve /src/loraserve
COPY settings /src/settings
RUN /opt/loraserve/bin/pip install --no-cache-dir --disable-pip-version-check --no-index --no-deps \
        --no-build-isolation /src \
    && rm -rf /src \
    && useradd --create-home --uid 10001 loraserve
ENV PATH=/opt/loraserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1
USER loraserve
WORKDIR /home/loraserve
CMD ["python", "-m", "frontend", "--help"]
