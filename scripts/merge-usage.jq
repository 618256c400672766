# Totals the output of `chatpool usage --json` from several instances into one report of the
# same shape: rows with the same tenant (and day or model, when grouped) are summed.
#
#   for c in a.toml b.toml c.toml; do chatpool --config "$c" usage --group-by day --json; done |
#     jq -s -f scripts/merge-usage.jq
{
  object: "list",
  data: ([.[].data[]]
    | group_by([.tenant, .day, .model])
    | map(.[0] + {
        requests: (map(.requests) | add),
        prompt_tokens: (map(.prompt_tokens) | add),
        completion_tokens: (map(.completion_tokens) | add),
        total_tokens: (map(.total_tokens) | add)
      }))
}
