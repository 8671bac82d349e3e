"""`exaconnect NOUN run|enqueue ...` for every registered stage family (`StageCommand`, declared
beside its stages in services/, a lab's included), through one verb loop; and `exaconnect
services`, the service list the deployments are made from."""

from __future__ import annotations

import argparse
import json

from exaconnect.cli.common import add_enqueue_arguments, add_queue_arguments, enqueue_one_stage, run_service_stages


def _run(command):
    def run(args: argparse.Namespace) -> int:
        run_service_stages(command.make_stages(args), args)
        return 0

    return run


def _enqueue(command):
    def enqueue(args: argparse.Namespace) -> int:
        return enqueue_one_stage(command.make_stages(args), args, command.noun)

    return enqueue


def register_stage_commands(subparsers) -> None:
    from exaconnect.services.stages import COMMANDS, STAGE_TYPES, services

    order = services()  # pipeline order: ours first, then a lab's
    first_service = {}
    for cls in STAGE_TYPES.values():
        first_service.setdefault(cls.stage_name.split(".")[0], cls.service)
    for command in sorted(COMMANDS.values(), key=lambda c: order.index(first_service.get(c.noun, c.noun))
                          if first_service.get(c.noun, c.noun) in order else len(order)):
        noun = subparsers.add_parser(command.noun, help=command.help)
        verbs = noun.add_subparsers(dest="verb", required=True)
        run = verbs.add_parser("run", help="every stage, here or through --queue ROOT")
        command.add_arguments(run)
        add_queue_arguments(run)
        run.set_defaults(func=_run(command))
        enqueue = verbs.add_parser("enqueue", help="only enqueue one stage's tasks on ROOT/SERVICE")
        command.add_arguments(enqueue)
        add_enqueue_arguments(enqueue, list(command.stage_choices) or ["all"])
        enqueue.set_defaults(func=_enqueue(command))


def cmd_services(args: argparse.Namespace) -> int:
    from exaconnect.services.stages import STAGE_TYPES, services

    names = services()
    if args.format == "lines":
        print("\n".join(names))
    elif args.format == "json":
        stages = {}
        for cls in STAGE_TYPES.values():
            stages.setdefault(cls.service, []).append(cls.stage_name)
        print(json.dumps({name: sorted(set(stages.get(name, []))) for name in names}, indent=1))
    else:  # helm values: one worker Deployment per service (helm install -f this file)
        print("services:")
        for name in names:
            print(f"  {name}: {{}}")
    return 0


def register(subparsers) -> None:
    register_stage_commands(subparsers)


def register_services(subparsers) -> None:
    p = subparsers.add_parser("services", help="the services (one queue and one worker kind each) of every "
                                               "registered stage, ours and a lab's")
    p.add_argument("--format", choices=["lines", "json", "helm-values"], default="lines",
                   help="lines: one name per line (deploy scripts); json: with their stages; helm-values: "
                        "a values file for the chart (-f)")
    p.set_defaults(func=cmd_services)
