# Tether ML training server for Visual Mapper: learns from Android exploration data over MQTT
# (Q-table by default, DQN with USE_DQN=true) and publishes Q-values / an ONNX model back.
#
#   docker build -f Dockerfile.ml -t tether-ml:latest .
#   docker run -d --name tether-ml --restart unless-stopped \
#     -e MQTT_BROKER=192.168.1.10 -e MQTT_PORT=1883 \
#     -e MQTT_USERNAME=mqtt_user -e MQTT_PASSWORD=mqtt_pass \
#     -v "$(pwd)/data:/app/data" tether-ml:latest
#
# Extra flags go after the image name, e.g. `tether-ml:latest --dqn --ha-discovery`.
# See docs/deployment-visual-mapper.md.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app

# The CPU build of PyTorch first: the default wheel brings CUDA libraries (gigabytes) that a
# Q-table or a small DQN does not need.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.3"

COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . && useradd --create-home --uid 1000 tether && mkdir -p /app/data && chown tether /app/data

USER tether

# Flags given to `docker run` win over these; see `tether mqtt --help`.
ENV MQTT_BROKER=localhost \
    MQTT_PORT=1883 \
    ML_DATA_DIR=/app/data \
    ML_TRAINING=true \
    USE_DQN=false

VOLUME ["/app/data"]

# SIGTERM (docker stop) makes the server save a checkpoint and publish "offline" before exiting.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tether", "mqtt"]
