//go:build tools

// Package tools pins the OpenBao command this module builds.
package tools

import _ "github.com/openbao/openbao"
