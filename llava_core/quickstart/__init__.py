"""What the quickstarts create on their first run, and the tests build on: faithful tiny stand-ins of the hub's base
models (`standins`), synthetic scene datasets (`synthetic`, `synthetic_onevision`) and the step that makes both for a
workflow's `synthetic:` section (`bootstrap`). Nothing here runs in a workflow without `synthetic:`."""
