# One image for every exaconnect service: the command picks the queue to work on.
#   docker build -t exaconnect .        (or: make image)
#   apptainer build exaconnect.sif docker-daemon://exaconnect:latest   (Aurora)
#   docker run exaconnect worker fq:///lus/project/queues/mesh
# On Aurora build with --build-arg EXTRAS=xpu for TensorFlow 2.15 + intel-extension-for-tensorflow.
FROM python:3.11-slim

ARG EXTRAS=""
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends build-essential && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/exaconnect
COPY pyproject.toml README.md ./
COPY exaconnect exaconnect
COPY precomputed precomputed
COPY services services
COPY ffn ffn
COPY viewer viewer
RUN pip install ".${EXTRAS:+[$EXTRAS]}"
ENTRYPOINT ["exaconnect"]
CMD ["--help"]
