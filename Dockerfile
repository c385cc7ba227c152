# token-broker container image: build a venv in one stage, copy it into a slim runtime stage with no build tools.
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY broker ./broker
RUN /opt/venv/bin/pip install '.[server,tracing]'

FROM python:3.11-slim
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin broker
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BROKER_LISTEN=0.0.0.0:50051 \
    BROKER_METRICS_LISTEN=0.0.0.0:9464 \
    BROKER_HEALTH_LISTEN=0.0.0.0:8086
USER 10001:10001
EXPOSE 50051 9464 8086
# The plaintext health port, so the check keeps working when the gRPC port requires (mutual) TLS.
HEALTHCHECK --interval=10s --timeout=4s CMD ["token-broker", "health", "--target", "127.0.0.1:8086", "--service", ""]
# Exec form: token-broker is PID 1's child-free process and receives SIGTERM directly.
ENTRYPOINT ["token-broker", "serve"]
