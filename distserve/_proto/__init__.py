"""Generated protocol modules (scripts/gen_proto.py); never edited by hand."""
