# The image every service runs from (docker-compose.yml picks the command).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY services ./services
COPY migrations ./migrations
COPY schemas ./schemas
RUN pip install --no-cache-dir -e .
ENV BILLING_DATA_DIR=/var/lib/billing
# Tokenizer files for estimated usage are seeded here from the installed wheels (no network).
ENV TIKTOKEN_CACHE_DIR=/var/lib/billing/tiktoken
# spool/ is the gateway's volume: created here so a new volume is owned by nobody too.
RUN mkdir -p /var/lib/billing/spool /var/lib/billing/tiktoken && chown -R nobody /var/lib/billing
USER nobody
ENTRYPOINT ["billing"]
