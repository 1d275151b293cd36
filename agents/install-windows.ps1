#Requires -Version 5.1
#Requires -RunAsAdministrator
<#
.SYNOPSIS
  Installs (or removes) the vm-healthcheck agent as a Scheduled Task running as SYSTEM.
.DESCRIPTION
  The token: -TokenFile FILE (its first line), or -Token TOKEN (visible to local users in the
  process list and kept in the console history: avoid). It only enrols: the server answers
  the first report with this VM's own credential, which the agent keeps and sends from then
  on. -Sha256 HEX refuses an agent script with another SHA-256. -Insecure allows an http://
  server (the token and the credential then cross the network in clear).
.EXAMPLE
  powershell -ExecutionPolicy Bypass -File install-windows.ps1 -Server https://monitor.example.net -TokenFile C:\secure\vmhc-token
.EXAMPLE
  powershell -ExecutionPolicy Bypass -File install-windows.ps1 -Uninstall
#>
[CmdletBinding()]
param(
    [string]$Server,
    [string]$TokenFile,
    [string]$Token,
    [ValidateRange(5, 3600)][int]$Interval = 30,
    [string]$Vmid = '',
    [string]$Node = '',
    [string]$Sha256 = '',
    [switch]$Insecure,
    [switch]$Uninstall
)

Set-StrictMode -Version 2.0
$ErrorActionPreference = 'Stop'
[Net.ServicePointManager]::SecurityProtocol = [Net.ServicePointManager]::SecurityProtocol -bor [Net.SecurityProtocolType]::Tls12

$TaskName = 'vm-healthcheck-agent'
$InstallDir = Join-Path $env:ProgramFiles 'vm-healthcheck'
$AgentPath = Join-Path $InstallDir 'windows-agent.ps1'
$ConfigDir = Join-Path $env:ProgramData 'vm-healthcheck'
$ConfigPath = Join-Path $ConfigDir 'agent.conf'

if ($Uninstall) {
    Unregister-ScheduledTask -TaskName $TaskName -Confirm:$false -ErrorAction SilentlyContinue
    Remove-Item -LiteralPath $InstallDir -Recurse -Force -ErrorAction SilentlyContinue
    Remove-Item -LiteralPath $ConfigDir -Recurse -Force -ErrorAction SilentlyContinue
    Write-Host '==> vm-healthcheck agent uninstalled'
    exit 0
}

if (-not $Server) { throw '-Server URL is required' }
$Server = $Server.TrimEnd('/')
if ($Server -match '^http://') {
    if (-not $Insecure) {
        throw ("refusing the http:// server ${Server}: the agent token and this VM's credential would cross the network in clear. " +
            'Use https:// (for example the server behind a TLS reverse proxy), or pass -Insecure to accept that')
    }
} elseif ($Server -notmatch '^https://') {
    throw '-Server must be an https:// URL (or http:// with -Insecure)'
}
if ($TokenFile -and $Token) { throw 'give the token once: -TokenFile FILE or -Token TOKEN' }
if ($TokenFile) {
    if (-not (Test-Path -LiteralPath $TokenFile -PathType Leaf)) { throw "cannot read the token file $TokenFile" }
    $Token = [string](Get-Content -LiteralPath $TokenFile -TotalCount 1)
} elseif ($Token) {
    Write-Warning ('-Token puts the token on the command line, where every local user sees it in the process list and the console ' +
        'history keeps it; use -TokenFile FILE instead')
} else {
    throw 'the agent token is required: -TokenFile FILE'
}
$Token = $Token.Trim()
if ($Token -notmatch '^[A-Za-z0-9._~+/=-]+$') { throw 'the token is empty or has characters a token cannot have' }
if ($Sha256 -and $Sha256 -notmatch '^[0-9A-Fa-f]{64}$') { throw '-Sha256 must be 64 hex digits (the SHA-256 of windows-agent.ps1)' }

# Downloaded and checked before anything is installed.
Write-Host "==> downloading the agent from $Server"
$download = [IO.Path]::GetTempFileName()
try {
    Invoke-WebRequest -Uri "$Server/agents/windows-agent.ps1" -OutFile $download -UseBasicParsing
    if ($Sha256) {
        $actual = (Get-FileHash -LiteralPath $download -Algorithm SHA256).Hash.ToLowerInvariant()
        if ($actual -ne $Sha256.ToLowerInvariant()) {
            throw "the agent script's SHA-256 is $actual, not $($Sha256.ToLowerInvariant()) as -Sha256 says: nothing installed"
        }
        Write-Host "==> the agent script's SHA-256 matches"
    }
    New-Item -ItemType Directory -Force -Path $InstallDir, $ConfigDir | Out-Null
    Copy-Item -LiteralPath $download -Destination $AgentPath -Force
} finally {
    Remove-Item -LiteralPath $download -Force -ErrorAction SilentlyContinue
}

# Only SYSTEM and Administrators may read the folder holding the token and the credential,
# and Administrators own it: an owner may rewrite the ACL, so no other account may own it.
$acl = New-Object System.Security.AccessControl.DirectorySecurity
$acl.SetOwner((New-Object System.Security.Principal.SecurityIdentifier('S-1-5-32-544')))
$acl.SetAccessRuleProtection($true, $false)
foreach ($sid in @('S-1-5-18', 'S-1-5-32-544')) {
    $identity = New-Object System.Security.Principal.SecurityIdentifier($sid)
    $rule = New-Object System.Security.AccessControl.FileSystemAccessRule($identity, 'FullControl', 'ContainerInherit,ObjectInherit', 'None', 'Allow')
    $acl.AddAccessRule($rule)
}
Set-Acl -LiteralPath $ConfigDir -AclObject $acl

$lines = @(
    '# vm-healthcheck agent configuration (written by install-windows.ps1)',
    "SERVER_URL=$Server",
    "AGENT_TOKEN=$Token",
    "INTERVAL_SECONDS=$Interval",
    "VMID=$Vmid",
    "NODE=$Node",
    "INSECURE=$(if ($Insecure) { 'true' } else { 'false' })"
)
[IO.File]::WriteAllLines($ConfigPath, $lines)
Write-Host "==> wrote $ConfigPath (SYSTEM and Administrators only)"
if (Test-Path -LiteralPath (Join-Path $ConfigDir 'credential')) {
    Write-Host "==> kept this VM's credential ($(Join-Path $ConfigDir 'credential')); windows-agent.ps1 -Enrol enrols it again with the token"
}

$action = New-ScheduledTaskAction -Execute 'powershell.exe' `
    -Argument "-NoProfile -NonInteractive -ExecutionPolicy Bypass -File `"$AgentPath`" -Tick"
$everyMinute = New-ScheduledTaskTrigger -Once -At (Get-Date) -RepetitionInterval (New-TimeSpan -Minutes 1)
$atStartup = New-ScheduledTaskTrigger -AtStartup
$principal = New-ScheduledTaskPrincipal -UserId 'SYSTEM' -LogonType ServiceAccount -RunLevel Highest
$settings = New-ScheduledTaskSettingsSet -MultipleInstances IgnoreNew -ExecutionTimeLimit (New-TimeSpan -Minutes 2) -StartWhenAvailable
Register-ScheduledTask -TaskName $TaskName -Action $action -Trigger @($atStartup, $everyMinute) `
    -Principal $principal -Settings $settings -Force | Out-Null
Write-Host "==> registered the '$TaskName' Scheduled Task (SYSTEM, at start-up and every minute)"

Write-Host '==> sending a first report'
& powershell.exe -NoProfile -ExecutionPolicy Bypass -File $AgentPath -Once -ConfigPath $ConfigPath
if ($LASTEXITCODE -ne 0) { throw 'installed, but the first report was not accepted (see the message above)' }
Write-Host "==> done: this VM now reports to $Server"
