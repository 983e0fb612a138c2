FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY events ./events
COPY runtime ./runtime
COPY coordinator ./coordinator
COPY agents ./agents
COPY projections ./projections
COPY cli ./cli
COPY benchmarks ./benchmarks
RUN pip install --no-cache-dir '.[postgres]'
ENV CAIRN_HOME=/data
VOLUME ["/data"]
