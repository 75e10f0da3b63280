// Wrapper module: builds External Secrets Operator (benchmark baseline only, never
// shipped). v0.16.2 is the last release that is one Go module; v1.x splits apis, runtime
// and every provider into submodules that the root go.mod replaces with local paths.
module keyhaven.io/e2e/external-secrets

go 1.24.2

require github.com/external-secrets/external-secrets v0.16.2

replace github.com/Masterminds/sprig/v3 => github.com/external-secrets/sprig/v3 v3.3.0
