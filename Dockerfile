# maml-service: one image for the control plane and the Ray workers.
# CPU by default; for GPU nodes build with BASE=rayproject/ray:2.60.0-py311-gpu (or a CUDA base)
# and TORCH_INDEX=https://download.pytorch.org/whl/cu128.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_SPEC="torch>=2.13"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Production by default: the service refuses to start without a strong MAML_ADMIN_TOKEN. To try the
# image locally: --build-arg MAML_ENV=development, or docker run -e MAML_ENV=development.
ARG MAML_ENV=production
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    MAML_ENV=${MAML_ENV} \
    MAML_DATA_DIR=/var/lib/maml \
    MAML_CACHE_DIR=/var/cache/maml

# The Ray images run as their user ray (uid 1000): root to install and add the user; USER maml
# below drops it again.
USER root
WORKDIR /app
RUN pip install --no-cache-dir --index-url ${TORCH_INDEX} "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY service ./service
COPY workers ./workers
COPY api ./api
COPY cli ./cli
# The user maml has uid 1000, the uid deploy/ runs the pods as. Where the base image already has a
# uid 1000 (rayproject/ray: ray, group users, owner of the Python in /home/ray/anaconda3), maml is a
# second name for it, with its group and home, rather than a new uid that might not run that Python.
RUN pip install --no-cache-dir . \
    && if getent passwd maml >/dev/null; then :; \
       elif ! getent passwd 1000 >/dev/null; then useradd --create-home --uid 1000 maml; \
       else useradd --non-unique --uid 1000 --gid "$(getent passwd 1000 | cut -d: -f4)" \
                    --home-dir "$(getent passwd 1000 | cut -d: -f6)" --no-create-home maml; fi \
    && { [ "$(id -u maml)" = 1000 ] || { echo "user maml exists with uid $(id -u maml), not 1000" >&2; exit 1; }; } \
    && mkdir -p /var/lib/maml /var/cache/maml && chown -R maml /var/lib/maml /var/cache/maml
USER maml
EXPOSE 8000
# Embedded mode: local Ray and SQLite in MAML_DATA_DIR. On a cluster set MAML_RAY_ADDRESS (and
# RAY_AUTH_TOKEN where the cluster uses token auth) and MAML_DATABASE_URL.
CMD ["maml", "serve", "--host", "0.0.0.0", "--port", "8000"]
