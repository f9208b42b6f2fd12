# imagegen: `docker build -t imagegen .` then `docker run imagegen` serves; `... imagegen migrate` migrates.
# Orchestrators probe the process (gRPC health, /readyz), so the image has no HEALTHCHECK of its own.
ARG PYTHON_IMAGE=python:3.11-slim-trixie

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# every dependency ships manylinux wheels, so the build needs pip and no compiler
RUN python -m venv --without-pip /opt/imagegen
COPY pyproject.toml ./
COPY server/ server/
COPY providers/ providers/
COPY storage/ storage/
COPY client/ client/
COPY sandbox/ sandbox/
COPY imagegen/ imagegen/
RUN pip --python /opt/imagegen/bin/python install --no-cache-dir . \
    && /opt/imagegen/bin/python -m compileall -q /opt/imagegen

FROM ${PYTHON_IMAGE}
# the final stage gets the installed environment only: no source tree, no build step, and not even the
# base image's packaging tools (nothing installs anything at run time)
RUN python -m pip uninstall --yes --no-cache-dir pip setuptools wheel \
    && groupadd --system --gid 10001 imagegen \
    && useradd --system --uid 10001 --gid imagegen --home-dir /var/lib/imagegen --no-create-home imagegen \
    && install -d -o imagegen -g imagegen -m 0750 /var/lib/imagegen
COPY --from=build /opt/imagegen /opt/imagegen
ENV PATH=/opt/imagegen/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    IMAGEGEN_DATA_DIR=/var/lib/imagegen \
    IMAGEGEN_GRPC_ADDRESS=0.0.0.0:50051 \
    IMAGEGEN_HTTP_ADDRESS=0.0.0.0:8080
WORKDIR /var/lib/imagegen
USER 10001:10001
EXPOSE 50051 8080
ENTRYPOINT ["python", "-m", "server"]
CMD ["serve"]
