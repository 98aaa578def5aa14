// Writes dashboard.ts: the dashboard JSON as a TypeScript literal typed as
// @grafana/schema's Dashboard (a literal, not a JSON import, so excess or
// misspelled properties are errors). The export-only import metadata
// (__inputs, __requires, __elements) is not part of the dashboard model and is
// checked by tests/dashboards.rs instead.
const fs = require('fs');
const dashboard = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
for (const key of ['__inputs', '__requires', '__elements']) delete dashboard[key];
fs.writeFileSync('dashboard.ts',
  "import type { Dashboard } from '@grafana/schema';\n" +
  "export const dashboard: Dashboard = " + JSON.stringify(dashboard, null, 2) + ";\n");
