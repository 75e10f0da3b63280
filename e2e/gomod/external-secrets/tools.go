//go:build tools

// Package tools pins the External Secrets Operator command this module builds.
package tools

import _ "github.com/external-secrets/external-secrets"
