"""A deployment as data: its instances, the actors of each, and where every socket is.

The launcher builds one ``DeploymentPlan`` per host from the command line and writes it
to the run directory; the supervisor starts one process per ``ActorSpec`` in it, and
each process reads the plan back and finds its own spec by name. Adding an instance is
one more ``InstanceSpec`` (and its actors); adding an actor kind is one row in
``xllm.deploy.kinds`` and the specs that use it.

Across hosts a plan describes only this host's part; the parts find each other through
the metadata store (``xllm.metastore.keys``): instances register their scheduler's
address, routers their report address, and each request carries its frontend's.

NOTE: addresses are derived here and nowhere else. Sockets only this host uses are
``ipc://`` paths in the run directory (a directory only this user can enter). Sockets
other hosts reach are ``tcp://`` on ``advertise_host`` when the plan has one, at fixed
offsets from ``base_port``; without one everything is ``ipc://``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import msgspec

from ..config import EngineConfig

ROLES = ("mixed", "prefill", "decode")  # what an instance does (disaggregation: prefill, decode)
HOST_ROLES = ("all", "router", "instance")  # what one xllm-launch runs (--role)


@dataclass(frozen=True)
class InstanceSpec:
    """One model instance: a scheduler and its worker ranks."""

    id: str  # unique in the deployment, e.g. "i0"
    role: str = "mixed"
    tp_size: int = 1

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"instance role must be one of {', '.join(ROLES)}; got {self.role!r}")


@dataclass(frozen=True)
class ActorSpec:
    """One actor process: its kind (a row of ``kinds.KINDS``) and where it belongs."""

    kind: str  # "store", "router", "frontend", "scheduler", "worker", "kv_agent", "http"
    name: str  # unique in the deployment; how the launcher reports it
    instance: str = ""  # the instance it serves ("" for service-level actors)
    rank: int = 0  # a worker's rank in its instance
    threads: int = 1  # torch/OpenMP threads of the process
    address: str = ""  # a frontend's SDK address; the http shim's frontend
    router: str = ""  # the router a frontend sends its requests to
    direct: str = ""  # the instance a frontend sends requests and aborts to itself (one-instance deployments)


@dataclass(frozen=True)
class DeploymentPlan:
    """This host's part of a deployment: engine settings, instances, actors, addresses."""

    run_dir: str  # private directory of this deployment on this host (ipc sockets, the plan)
    engine: EngineConfig
    instances: tuple[InstanceSpec, ...] = ()
    actors: tuple[ActorSpec, ...] = ()
    deployment: str = "default"  # names the deployment's keys in the store
    metastore: str = "embedded"  # "embedded" (the store actor of this host) or etcd://HOST:PORT
    advertise_host: str = ""  # this host's address for other hosts; "" = one host, all ipc
    base_port: int = 7200  # tcp ports of the sockets other hosts reach start here
    key_dir: str = ""  # CURVE keys of the cluster (xllm.bus.curve); "" = no authentication

    # -- lookup -----------------------------------------------------------------------------
    def actor(self, name: str) -> ActorSpec:
        for a in self.actors:
            if a.name == name:
                return a
        raise KeyError(f"no actor {name!r} in the plan")

    def instance(self, instance_id: str) -> InstanceSpec:
        for i in self.instances:
            if i.id == instance_id:
                return i
        raise KeyError(f"no instance {instance_id!r} in the plan")

    def of_kind(self, kind: str) -> list[ActorSpec]:
        return [a for a in self.actors if a.kind == kind]

    def has_kv_agent(self, instance_id: str) -> bool:
        """Whether an instance has a KV agent, and so keeps its workers' KV pool in shared
        memory the agent maps (``kv_pool``)."""
        return _needs_kv_agent(self.instance(instance_id), self.engine)

    @property
    def alone(self) -> bool:
        """One instance, and no other can join (the store is this host's own)."""
        return _alone(self.instances, self.metastore)

    @property
    def sdk_address(self) -> str:
        """Where SDK clients connect: the first frontend's address."""
        return self.of_kind("frontend")[0].address

    # -- addresses --------------------------------------------------------------------------
    def _ipc(self, name: str) -> str:
        return f"ipc://{self.run_dir}/{name}"

    def _reachable(self, name: str, offset: int) -> str:
        """A socket other hosts connect to: tcp when the plan spans hosts."""
        if self.advertise_host:
            return f"tcp://{self.advertise_host}:{self.base_port + offset}"
        return self._ipc(name)

    def _index(self, kind: str, name: str) -> int:
        return [a.name for a in self.of_kind(kind)].index(name)

    @property
    def launcher(self) -> str:
        """The supervisor's inbox (ready and failed reports)."""
        return self._ipc("launcher")

    @property
    def store(self) -> str:
        """The embedded store actor's socket."""
        return self._ipc("store")

    def router_in(self, name: str) -> str:
        """Frontends' requests, aborts and control calls to a router."""
        return self._ipc(f"{name}-in")

    def router_reports(self, name: str) -> str:
        """Instances' load reports, KV events and control replies to a router."""
        return self._reachable(f"{name}-reports", 10 * self._index("router", name))

    def frontend_in(self, name: str) -> str:
        """Where a frontend receives what the schedulers send it (its requests' route)."""
        return self._reachable(f"{name}-in", 10 * self._index("frontend", name) + 1)

    def scheduler_in(self, instance: str) -> str:
        """An instance's scheduler input (requests from the routers)."""
        index = [i.id for i in self.instances].index(instance)
        return self._reachable(f"{instance}-scheduler-in", 100 + index)

    def kv_agent_in(self, instance: str) -> str:
        """An instance's KV agent input: its scheduler's orders and other agents' KV."""
        index = [i.id for i in self.instances].index(instance)
        return self._reachable(f"{instance}-kv-agent-in", 200 + index)

    def kv_pool(self, instance: str, rank: int) -> str:
        """The shared-memory file of one rank's KV pool (``xllm.kv_transfer.pool``)."""
        from ..kv_transfer.pool import pool_path

        return str(pool_path(self.run_dir, instance, rank))

    def plan(self, instance: str, rank: int) -> str:
        """Step plans from an instance's scheduler to one of its ranks."""
        return self._ipc(f"{instance}-plan-{rank}")

    def results(self, instance: str) -> str:
        """Step results and heartbeats from an instance's ranks to its scheduler."""
        return self._ipc(f"{instance}-results")

    def dist_init(self, instance: str) -> str:
        """torch.distributed rendezvous of an instance's ranks."""
        return f"file://{self.run_dir}/{instance}-dist-init"

    def shm_key(self, instance: str) -> str:
        """The name an instance's shared-memory segments are derived from."""
        return f"{self.run_dir}/{instance}"

    # -- files ------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "DeploymentPlan":
        return msgspec.json.decode(text, type=cls)


def _needs_kv_agent(inst: InstanceSpec, engine: EngineConfig) -> bool:
    """A KV agent moves an instance's blocks to other instances (prefill/decode) and between
    its own tiers (device, host, disk)."""
    return inst.role != "mixed" or engine.cache.tiers


def _alone(instances: tuple[InstanceSpec, ...], metastore: str) -> bool:
    return len(instances) == 1 and metastore == "embedded"


def _numbered(base: str, n: int, count: int) -> str:
    return base if count == 1 else f"{base}-{n}"


def frontend_address(address: str, n: int) -> str:
    """Frontend ``n``'s SDK address: ``address`` itself for the first, then the next ports
    (tcp) or numbered paths (ipc)."""
    if n == 0:
        return address
    if address.startswith("tcp://"):
        host, _, port = address.rpartition(":")
        return f"{host}:{int(port) + n}"
    return f"{address}-{n}"


def host_plan(engine: EngineConfig, run_dir: str, sdk_address: str, *, role: str = "all",
              num_instances: int = 1, instance_prefix: str = "i", tp_size: int = 1,
              threads_per_worker: int = 1, num_frontends: int = 1, num_routers: int = 1,
              http: bool = False, instance_roles: tuple[str, ...] = (), **where) -> DeploymentPlan:
    """The plan of one ``xllm-launch``.

    ``role`` "all" runs everything here: the embedded store (unless ``where`` names an
    etcd), ``num_routers`` routers, ``num_frontends`` frontends (frontend k sends to router
    k mod ``num_routers``), ``num_instances`` instances of ``tp_size`` ranks, and the HTTP
    shim. With one instance and the embedded store no other instance can join, so the
    frontends send requests and aborts straight to it (``ActorSpec.direct``): the router
    keeps the registry and answers control calls, but a request costs no extra hop. "router" runs the service side only (routers, frontends, HTTP); "instance" runs
    instances only. With one instance its actors keep plain names ("scheduler",
    "worker-0"); with several they carry its id ("i1.scheduler", "i1.worker-0").
    """
    if role not in HOST_ROLES:
        raise ValueError(f"role must be one of {', '.join(HOST_ROLES)}; got {role!r}")
    service, serving = role in ("all", "router"), role in ("all", "instance")
    roles = tuple(instance_roles) or ("mixed",) * num_instances
    if len(roles) != num_instances:
        raise ValueError(f"{len(roles)} instance roles for {num_instances} instances")
    instances = tuple(InstanceSpec(f"{instance_prefix}{n}", role=roles[n], tp_size=tp_size)
                      for n in range(num_instances)) if serving else ()
    actors: list[ActorSpec] = []
    if where.get("metastore", "embedded") == "embedded":
        actors.append(ActorSpec("store", "store"))
    for inst in instances:
        prefix = f"{inst.id}." if len(instances) > 1 else ""
        actors += [ActorSpec("worker", f"{prefix}worker-{r}", inst.id, r, threads_per_worker)
                   for r in range(inst.tp_size)]
        actors.append(ActorSpec("scheduler", f"{prefix}scheduler", inst.id))
        if _needs_kv_agent(inst, engine):
            actors.append(ActorSpec("kv_agent", f"{prefix}kv-agent", inst.id))
    if service:
        routers = [_numbered("router", n, num_routers) for n in range(num_routers)]
        actors += [ActorSpec("router", name) for name in routers]
        alone = _alone(instances, where.get("metastore", "embedded"))
        actors += [ActorSpec("frontend", _numbered("frontend", n, num_frontends),
                             address=frontend_address(sdk_address, n), router=routers[n % num_routers],
                             direct=instances[0].id if alone else "")
                   for n in range(num_frontends)]
        if http:
            actors.append(ActorSpec("http", "http", address=sdk_address))
    return DeploymentPlan(run_dir, engine, instances, tuple(actors), **where)
