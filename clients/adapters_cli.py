"""`loraplex adapters list|show|load|unload|merge|unmerge`: the AdapterService from the command line."""

import json
import sys


def add_adapters(commands, connection) -> None:
    p = commands.add_parser("adapters", parents=[connection],
                            help="list, show, load, unload, merge or unmerge LoRA adapters")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    verbs.add_parser("list", parents=[connection], help="adapters in memory and under the adapter roots")
    for verb, text in (("show", "one adapter's details"), ("load", "read and validate an adapter now"),
                       ("unload", "drop an adapter from memory"),
                       ("merge", "merge an adapter into a copy of the weights (its requests run with no LoRA work)")):
        v = verbs.add_parser(verb, parents=[connection], help=text)
        v.add_argument("adapter_id")
        if verb == "load":
            v.add_argument("--pin", action="store_true", help="keep it on the device")
        if verb == "merge":
            v.add_argument("--method", choices=("dense", "requantize", "exact"),
                           help="dense (equal to the adapter), requantize (4-bit) or exact (QA-LoRA into an int4 "
                                "base's zeros) [the server's --merge-method]")
        if verb != "show":
            _replica_flag(v)
    _replica_flag(verbs.add_parser("unmerge", parents=[connection], help="drop the merged adapter's copy of the weights"))
    p.set_defaults(run=_run)


def _replica_flag(parser) -> None:
    parser.add_argument("--replica", default="", help="on a cluster front: only this replica (an id from `list`) "
                                                      "[every replica]")


def _run(args, _extra) -> int:
    from .admin import AdapterAdmin, as_dict
    from .tls import credentials

    with AdapterAdmin(args.target, timeout=args.timeout, token=args.token, credentials=credentials(args)) as admin:
        if args.verb == "list":
            for info in admin.list():
                kind = f"{info.format or '-'} v{info.version}" if info.state == "LOADED" else "-"
                merged = f" merged ({info.merge.method.lower()}, keeps {info.merge.retained:.1%})" if info.merge else ""
                where = f" on {','.join(info.replicas)}" if info.replicas else ""
                print(f"{info.adapter_id:<32} {info.state:<9} {info.tier:<7} {kind:<12} rank {info.rank:<3} "
                      f"{','.join(info.target_modules)}{merged}{where}")
            return 0
        if args.verb in ("merge", "unmerge"):
            info = (admin.unmerge(args.replica) if args.verb == "unmerge"
                    else admin.merge(args.adapter_id, args.method, args.replica))
            if info.warning:
                print(f"warning: {info.warning}", file=sys.stderr)
        else:
            if args.verb == "show":
                info = admin.get(args.adapter_id)
            elif args.verb == "unload":
                info = admin.unload(args.adapter_id, args.replica)
            else:
                info = admin.load(args.adapter_id, pin=args.pin, replica=args.replica)
        print(json.dumps(as_dict(info), indent=2))
    return 0
