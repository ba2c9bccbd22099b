"""Where things live in the cluster store."""

WORKERS = "/lego/workers/"
WORKFLOWS = "/lego/workflows/"
COORDINATOR_LEADER = "/lego/coordinator/leader"
SERVICES = "/lego/services/"


def worker(worker_id: str) -> str:
    return WORKERS + worker_id


def workflow(name: str) -> str:
    return WORKFLOWS + name


def service(kind: str, instance: str) -> str:
    return f"{SERVICES}{kind}/{instance}"


# The worker count a local process cluster (`lego up --store etcd://…`) keeps; `lego scale-workers` sets it.
DESIRED_WORKERS = "/lego/config/workers"
