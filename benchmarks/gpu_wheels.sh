#!/usr/bin/env bash
# Wheels that the lent GPU machine lacks for bicot's CLI, MLflow logging and the tests that read MLflow back
# (mlflow, jsonargparse[signatures], omegaconf and what they need that its image does not hold, as listed in
# the device tool's KINDS.md on 2026-11-17): 48 wheels, about 35 MiB. Run it here, where the package
# registries answer, from the repository root:
#
#     echo /.whl/ >> .git/info/exclude      # once: the wheels travel with a run but are never committed
#     bash benchmarks/gpu_wheels.sh         # -> .whl/
#
# Then name `.whl` in the device run's `carry`: benchmarks/gpu_checks.sh installs them into /tmp/site when
# the folder is there, so its `tests` part also runs tests/callbacks/test_phase_memory.py (a fit through the
# CLI into MLflow on the GPU). Versions are the ones this project's CPU environment resolved.
set -euo pipefail
dest=${1:-.whl}
mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest" \
    alembic==1.20.1 annotated-types==0.8.0 blinker==1.9.0 cachetools==7.3.3 cffi==2.1.1 cryptography==50.0.2 \
    databricks-sdk==0.162.0 docker==7.2.0 docstring-parser==0.18.0 fastapi==0.165.0 flask==3.1.3 \
    flask-cors==6.0.5 gitdb==4.0.12 gitpython==3.2.1 google-auth==2.63.0 graphene==3.4.3 graphql-core==3.2.14 \
    graphql-relay==3.2.0 gunicorn==26.2.0 huey==3.5.4 importlib-metadata==9.1.0 itsdangerous==2.2.0 \
    jsonargparse==4.53.0 mako==1.4.3 mlflow==3.17.2 mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 \
    omegaconf==2.4.0 opentelemetry-api==1.45.2 opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2 \
    opentelemetry-semantic-conventions==0.66b2 prettytable==3.18.0 pyasn1==0.6.5 pyasn1-modules==0.4.2 \
    pycparser==3.12 pydantic==2.14.4 pydantic-core==2.50.5 python-dotenv==1.2.4 skops==0.16.0 smmap==5.0.3 \
    sqlalchemy==2.1.9 sqlparse==0.6.1 starlette==1.10.0 typeshed-client==2.15.0 typing-inspection==0.4.5 \
    uvicorn==0.54.0 wcwidth==0.9.4
echo "$(ls "$dest"/*.whl | wc -l) wheels, $(du -sh "$dest" | cut -f1) in $dest"
