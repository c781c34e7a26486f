# The image every service runs from (docker-compose.yml picks the command).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY services ./services
COPY migrations ./migrations
COPY schemas ./schemas
RUN pip install --no-cache-dir -e .
ENV BILLING_DATA_DIR=/var/lib/billing
RUN mkdir -p /var/lib/billing && chown nobody /var/lib/billing
USER nobody
ENTRYPOINT ["billing"]
