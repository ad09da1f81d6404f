# One image for every process of the Procfile, for platforms that run containers (Fly.io, Render,
# Cloud Run, Kubernetes...). Installed as the buildpack installs it: requirements.txt, the project
# at the tested pins. PROCESS names the Procfile entry a container runs (web, worker, notifier,
# beat, flower, release), so the commands live in the Procfile only:
#   docker build -t incidents .
#   docker run --env-file prod.env -e PROCESS=release incidents
#   docker run --env-file prod.env -e PORT=5000 -p 5000:5000 incidents
#   docker run --env-file prod.env -e PROCESS=worker incidents
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PROCESS=web PORT=5000
WORKDIR /app
# requirements.txt installs "." (the project), so the whole tree is needed first (.dockerignore
# keeps virtualenvs, caches and .git out).
COPY . .
RUN pip install -r requirements.txt && useradd --no-create-home app
USER app
EXPOSE 5000
# The Procfile's command for $PROCESS; bash execs a command that is one program (all of them are),
# so gunicorn or celery itself is PID 1 and gets the platform's SIGTERM.
CMD ["bash", "-c", "command=$(sed -n \"s/^$PROCESS: //p\" Procfile); test -n \"$command\" || { echo \"no $PROCESS in the Procfile\" >&2; exit 1; }; exec bash -c \"$command\""]
