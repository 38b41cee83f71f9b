# One image for the gateway, the trainer and the one-shot jobs (migrate, model prepare).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
RUN useradd --create-home --uid 1000 chatloop
# the named volumes' mount points, owned by the user that writes them: a fresh volume takes
# its owner from the image (model preparation writes /models, the trainer /adapters, /runs)
RUN mkdir -p /models /adapters /runs && chown chatloop:chatloop /models /adapters /runs
COPY pyproject.toml README.md ./
COPY chatloop chatloop
COPY bots bots
COPY inference inference
COPY feedback feedback
COPY storage storage
RUN pip install 'torch==2.13.0' && pip install .
USER chatloop
EXPOSE 8000
CMD ["chatloop", "serve"]
